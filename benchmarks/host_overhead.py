"""What a CPU can show of the EAA's cost on a GPU, where sampling is launch-bound: host work per patched block call,
operators per UNet call, bytes moved between devices per run, and what keeping the reference's K/V (twice the
features' memory) saves against projecting them from the kept features at every step.

    python benchmarks/host_overhead.py [--steps 20] [--repeats 5]

On the tiny in-process SD1.5-shaped model at an 8x8 latent every kernel takes microseconds, so the time spent
inside the pack's attention patches is host overhead (Python, dispatch), the cost a launch-bound GPU pays per call.
Operators are counted with torch.profiler (each top-level aten operator is at least one kernel launch on a GPU).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from invadapter_core.comfyui.host import use_comfyui  # noqa: E402

use_comfyui()

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import comfy.patcher_extension as ext  # noqa: E402
import comfy.sample  # noqa: E402
from invadapter_core.adapter.application import Application, install  # noqa: E402
from invadapter_core.reference.encode import invert_latent  # noqa: E402
from invadapter_core.adapter.injection import ADD, STASH  # noqa: E402
from invadapter_core.adapter.weights import init_from_model  # noqa: E402
from support.models import text_context, tiny_sd15_model  # noqa: E402

OURS = set(STASH.values()) | set(ADD.values())


def timed_patches(model, totals: dict, ours: set = OURS):
    """A clone whose Inv-Adapter patches (``ours``) add their wall time and call count to ``totals``."""
    m = model.clone()
    patches = m.model_options["transformer_options"]["patches"]
    for slot, fns in patches.items():
        def wrap(fn):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    totals["s"] += time.perf_counter() - start
                    totals["calls"] += 1
            return timed
        patches[slot] = [wrap(fn) if fn in ours else fn for fn in fns]
    return m


def counted_unet_calls(model, counter: list):
    m = model.clone()
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, "count",
                           lambda ex, *a, **k: counter.append(1) or ex(*a, **k))
    return m


def aten_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    # top-level operators only: an aten op called by another aten op is part of its parent's work
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, caption = tiny_sd15_model(), text_context(seed=11)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    ref = invert_latent(model, latent, caption, args.steps, "simple", (64, 64))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def sample(m):
        return comfy.sample.sample(m, noise, args.steps, 7.0, "euler", "simple", [[caption, {}]],
                                   [[torch.zeros_like(caption), {}]], torch.zeros(1, 4, 8, 8), disable_pbar=True,
                                   seed=5)

    app = Application(init_from_model(""), ref, model, 1.0, 1.0)
    applied = install(model, app)
    sample(applied)  # cold run: inversion features projected into the K/V store
    passes = ref.features.passes
    moved = [p.bytes_moved for p in ref.features.packs() + [app.kv_store.pack]]

    totals = {"s": 0.0, "calls": 0}
    timed = timed_patches(applied, totals)
    per_call = []
    for _ in range(args.repeats):
        totals.update(s=0.0, calls=0)
        sample(timed)
        per_call.append(totals["s"] / max(totals["calls"] // 2, 1))  # a stash and an add per patched block call
    calls = []
    sample(counted_unet_calls(model, calls))
    plain_ops, warm_ops = aten_ops(lambda: sample(model)), aten_ops(lambda: sample(applied))
    warm_passes = ref.features.passes - passes
    blocks = len(app.layout.blocks)
    # keeping K/V (the store) against keeping only f_s and projecting K/V from it at every step
    projecting = install(model, Application(init_from_model(""), ref, model, 1.0, 1.0, keep_kv=False))
    sample(projecting)
    projected_ops = aten_ops(lambda: sample(projecting))
    warm_s = {"kv_kept": [], "kv_projected": []}
    for _ in range(args.repeats):
        for key, m in (("kv_kept", applied), ("kv_projected", projecting)):
            start = time.perf_counter()
            sample(m)
            warm_s[key].append(time.perf_counter() - start)
    result = {
        "host_us_per_patched_block_call": round(statistics.median(per_call) * 1e6, 1),
        "aten_ops_per_unet_call": {"plain": round(plain_ops / len(calls), 1), "warm": round(warm_ops / len(calls), 1),
                                   "extra_per_block": round((warm_ops - plain_ops) / len(calls) / blocks, 2)},
        "reference_passes_warm_run": warm_passes,
        "reference_passes_alternating": ref.features.passes - passes - warm_passes,
        "bytes_moved_between_devices_warm_run": sum(p.bytes_moved for p in ref.features.packs() + [app.kv_store.pack])
                                                - sum(moved),
        "kv_store_mb": round(app.kv_store.pack.nbytes / 2**20, 3), "feature_cache_mb": round(ref.features.nbytes() / 2**20, 3),
        "warm_run_s": {k: round(statistics.median(v), 4) for k, v in warm_s.items()},
        "aten_ops_per_unet_call_kv_projected": round(projected_ops / len(calls), 1),
        "settings": {"model": "tiny SD1.5-shaped (tests/support/models.py)", "latent": "8x8", "steps": args.steps,
                     "cfg": 7.0, "blocks": blocks, "unet_calls": len(calls), "threads": 1,
                     "torch": torch.__version__},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
