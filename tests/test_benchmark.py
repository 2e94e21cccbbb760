"""benchmarks/overhead.py runs end to end and prints the JSON line the performance issue specifies (a tiny run on the
shallow checkpoint: this checks the script and its bookkeeping, not the timings)."""
import json
import subprocess

from support import host, models

KEYS = {"plain_s", "cold_s", "warm_s", "naive_s", "ratio_cold", "ratio_warm", "ratio_naive", "encode_s",
        "ref_cache_mb", "ref_cache_mb_per_step_fp16_formula", "formula_resolution", "peak_rss_mb", "rss_first_mb",
        "rss_last_mb",
        "reference_passes", "settings"}


def test_overhead_benchmark_prints_its_json_line():
    cmd = [host.python_exe(), str(host.ROOT / "benchmarks" / "overhead.py"),
           "--checkpoint", str(models.shallow_sd15_checkpoint()), "--size", "64", "--ref-size", "64",
           "--steps", "3", "--repeats", "1", "--rss-runs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=host.ROOT)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result), KEYS - set(result)
    # warm reuses every feature; naive recomputes one per step; cold adds only sigma_max to the inversion's
    assert result["reference_passes"] == {"cold": 1, "warm": 0, "naive": 3}
    assert 0 < result["encode_s"] < result["cold_s"]
    assert result["settings"]["steps"] == 3 and result["settings"]["cfg"] == 7.0
    # the cache formula at 512 px in half precision, for the shallow UNet's 10 blocks (3 per resolution + middle):
    # 2 B x (3*4096*320 + 3*1024*640 + 3*256*1280 + 64*1280) = 13.28 MiB (the full UNet's 16 blocks: 22.03 MiB)
    assert result["formula_resolution"] == 512 and result["ref_cache_mb_per_step_fp16_formula"] == 13.28


def test_host_overhead_benchmark_counts_what_a_gpu_pays_per_call():
    """benchmarks/host_overhead.py: a warm run makes no reference pass and moves no bytes, and each patched block
    call adds a fixed, small set of operators (counted, not timed: q projection, attention and its head reshapes,
    the output matmul, the bias and the residual add; the issue's profile found 30)."""
    cmd = [host.python_exe(), str(host.ROOT / "benchmarks" / "host_overhead.py"), "--steps", "4", "--repeats", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=host.ROOT)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reference_passes_warm_run"] == 0 and result["bytes_moved_between_devices_warm_run"] == 0
    # 9 per call, plus per-run work (the output bias, once per block and run) spread over few steps
    assert result["aten_ops_per_unet_call"]["extra_per_block"] <= 12, result
    assert result["host_us_per_patched_block_call"] > 0 and result["kv_store_mb"] > 0
