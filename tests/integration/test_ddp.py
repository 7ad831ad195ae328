"""Distributed correctness on CPU with real processes (gloo): DDP equals accumulation, ranks see disjoint data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).resolve().parents[1] / "helpers" / "ddp_equivalence_job.py"


def _run(out: Path, devices: int, accumulation: int) -> None:
    proc = subprocess.run([sys.executable, str(JOB), str(out), str(devices), str(accumulation)],
                          capture_output=True, text=True, timeout=300, cwd=JOB.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_twice_the_accumulation(tmp_path):
    _run(tmp_path / "ddp", devices=2, accumulation=2)
    _run(tmp_path / "single", devices=1, accumulation=4)
    a = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "final.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    rank0, rank1 = (set(json.loads((tmp_path / "ddp" / f"rows-rank{r}.json").read_text())) for r in (0, 1))
    single = set(json.loads((tmp_path / "single" / "rows-rank0.json").read_text()))
    assert rank0.isdisjoint(rank1) and rank0 | rank1 == single
