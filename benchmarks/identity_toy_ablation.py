"""IDAdapter's ingredients measured one by one on identities the adapter never saw (issue 21).

    .venv/bin/python benchmarks/identity_toy_ablation.py [--seeds 0,1,2] [--out out/identity-toy-ablation]
        [-- any benchmarks/identity_toy.py settings, applied to every run]

Runs ``benchmarks/identity_toy.py`` (unseen identities) once per arm and seed, one run at a time (two CPU jobs at
once slow each other more than they gain):
- baseline (one reference per target, denoising loss only): also measures no adapter and the training-free
  default (the same for every arm of a seed: same held-out identities, poses and noise);
- + MFF: K = 2 photos of the identity per target (train.references; the pool holds 2 per identity), concat as at
  inference; evaluated with 1 and 2;
- + identity loss: loss.identity (the toy's recognizer, trained on the training identities only);
- + token: the identity token, k = 2 embeddings mapped from the reference's features appended to the pose context
  (model.identity_tokens; identity_toy_lib.token_path);
- MFF + identity loss: the benchmark's and the trainer's defaults (the README's earlier "all");
- all: the three.
Each arm's held-out-identity figures are printed as a
Markdown table (mean and spread over the seeds); the last line is one JSON object with every run's report.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every ingredient named in every arm: the benchmark's own defaults are the chosen ones (MFF + identity loss)
ONE, NO_LOSS = ["--references", "1"], ["--identity-loss", "0"]
MFF = ["--references", "2", "--eval-references", "1,2"]
IDENTITY_LOSS = ["--identity-loss", "1.0"]
TOKEN = ["--identity-tokens", "2"]
ARMS = {
    "baseline": ONE + NO_LOSS,  # one reference, the denoising loss only: the trainer before issue 21
    "+ MFF (K = 2)": MFF + NO_LOSS,
    "+ identity loss": ONE + IDENTITY_LOSS,
    "+ token": ONE + NO_LOSS + TOKEN,
    "MFF + identity loss": MFF + IDENTITY_LOSS,  # the defaults (what "all" measured before the identity token)
    "all": MFF + IDENTITY_LOSS + TOKEN,
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--out", type=Path, default=REPO / "out" / "identity-toy-ablation")
    p.add_argument("settings", nargs="*", help="after --: settings for every benchmarks/identity_toy.py run")
    return p.parse_args(argv)


def run(arm: str, extra: list[str], seed: int, args) -> dict:
    out = args.out / f"{arm.replace(' ', '_').replace('+', 'plus').replace('(', '').replace(')', '').replace('=', '')}" \
                     f"-seed{seed}"
    baseline = arm == next(iter(ARMS))
    command = [sys.executable, str(REPO / "benchmarks" / "identity_toy.py"), "--seed", str(seed),
               "--out", str(out), *args.settings, *extra]
    if not baseline:
        command += ["--arms", "trained"]  # no adapter / training-free: measured once per seed, by the baseline
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{arm} at seed {seed} failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[ablation] {arm}, seed {seed}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return report


def table(reports: dict) -> str:
    rows = ["| arm | seeds | held-out identities: attribute accuracy | exact identity | embedding similarity |",
            "|---|---|---|---|---|"]

    def cell(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.pstdev(values):.1f} %" if values else "-"

    lines = {}
    for arm, by_seed in reports.items():
        for report in by_seed.values():
            for name, figures in report.get("unseen_identities", {}).items():
                label = name if arm == next(iter(ARMS)) or name.startswith(("no adapter", "training-free")) \
                    else f"{arm}: {name}"
                entry = lines.setdefault(label, ([], [], []))
                entry[0].append(figures["identity_accuracy"])
                entry[1].append(figures["exact_identity_rate"])
                entry[2].append(figures["embedding_similarity"])
    for label, (accuracy, exact, similarity) in lines.items():
        rows.append(f"| {label} | {len(accuracy)} | {cell(accuracy)} | {cell(exact)} | "
                    f"{statistics.mean(similarity):.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [a.strip() for a in args.arms.split(",")]
    unknown = [a for a in wanted if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; arms: {', '.join(ARMS)}")
    started = time.time()
    reports = {arm: {seed: run(arm, ARMS[arm], seed, args) for seed in seeds} for arm in ARMS if arm in wanted}
    print(table(reports))
    print(json.dumps({"seeds": seeds, "seconds": round(time.time() - started, 1), "runs": reports}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
