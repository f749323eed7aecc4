"""Runs an example script in quick mode on the shared MNIST file, for the smoke tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(framework: str, script: str, out: Path, timeout: int = 120) -> str:
    """stdout of ``examples/<framework>/<script> --quick --out <out>`` (``script`` may carry options);
    skips without MNIST and asserts a clean exit and a report with percentages and a wall time."""
    shared = Path(os.environ.get("ROBEVAL_SHARED", ROOT.parent / "shared"))
    data = os.environ.get("ROBEVAL_DATA") or str(shared / "data" / "mnist.npz")
    if not Path(data).exists():
        pytest.skip(f"MNIST not found at {data}; set ROBEVAL_DATA")
    env = {**os.environ, "ROBEVAL_DATA": data, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    name, *options = script.split()
    done = subprocess.run([sys.executable, str(ROOT / "examples" / framework / name), *options, "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wall time" in done.stdout and re.search(r"\d+\.\d\d%", done.stdout), done.stdout[-2000:]
    return done.stdout
