"""benchmarks/tensorrt_smoke.py without a TensorRT GPU: one clear line, exit status 0."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mixq.speedup.backends import get_backend
from mixq.speedup.backends.base import BackendUnavailable

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tensorrt_smoke.py"


def _has_tensorrt_gpu() -> bool:
    try:
        get_backend("tensorrt").check_available()
    except BackendUnavailable:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt_gpu(), reason="a TensorRT GPU is here: the script would run for minutes")
def test_smoke_script_says_why_it_skips():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensorrt_smoke: skipped, no TensorRT GPU here: ")
