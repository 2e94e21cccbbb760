"""benchmarks/identity_toy.py as the toy tests run it: a subprocess with their settings, its JSON line parsed."""
from __future__ import annotations

import json
import os
import subprocess

from . import host


def run_identity_toy(settings: list[str], out, threads: int) -> dict:
    """The benchmark's report (its last stdout line) for ``settings``, writing into ``out``; OMP_NUM_THREADS =
    ``threads``. Fails with the tail of its stderr if it fails."""
    done = subprocess.run([host.python_exe(), str(host.ROOT / "benchmarks" / "identity_toy.py"), *settings,
                           "--out", str(out)], capture_output=True, text=True, timeout=1500, cwd=host.ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
