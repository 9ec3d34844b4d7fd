"""bench/gpu_check.sh: loud and clear without a GPU, and its checks run on the CPU (dry mode)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: gpu_check would run for real")
def test_without_a_gpu_it_stops_at_once_saying_why():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert r.returncode == 2
    assert "gpu_check: cannot run: no CUDA GPU" in r.stderr and "--device cpu --quick" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_dry_run_on_the_cpu_prints_one_table_of_passing_checks():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=1500,
    )
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert table[0] == "| check | result | s | ok |" and len(table) == 2 + 8
    assert all(line.endswith("| yes |") for line in table[2:]), "\n".join(table)
    assert any("k=5000 gave 5000 ids" in line for line in table)
