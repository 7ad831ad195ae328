"""The training-throughput bench runs end to end on CPU and writes a complete, sane JSON (no timing asserts)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_tiny_bench_writes_complete_json(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--case", "cpu-tiny",
           "--steps", "2", "--warmup", "1", "--rounds", "2", "--micro-batch", "4", "--out-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x HF" in res.stdout  # the table was printed

    record = json.loads((tmp_path / "train_throughput_cpu-tiny.json").read_text())
    assert record["case"] == "cpu-tiny" and record["device"]["type"] == "cpu"
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    s = record["settings"]
    assert (s["preset"], s["seq_len"], s["micro_batch"], s["precision"]) == ("tiny", 128, 4, "fp32")
    assert s["torch_threads"] >= 1 and "fused=False" in s["optimizer"]  # for-each AdamW on CPU unless asked
    assert record["config"]["hidden_size"] == 128 and record["config"]["vocab_size"] == 8192
    # The two models started from the same weights: their eval losses on the same batch agree.
    p = record["parity"]
    assert p["abs_diff"] <= p["tolerance"] and abs(p["ours_loss"] - math.log(8192)) < 1.0

    assert set(record["results"]) == {"hf", "ours"} and record["hf"] == "hf"
    for name, r in record["results"].items():
        assert r["timed_steps"] == 2, name
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), name
        assert r["tokens_per_s_rounds"] and all(t > 0 for t in r["tokens_per_s_rounds"]), name
        assert r["speedup_vs_hf_median_round"] > 0 and r["speedup_vs_hf_cpu_time_median_round"] > 0, name
        for key in ("speedup_vs_hf_round_spread", "speedup_vs_hf_cpu_time_spread"):  # min, quartiles, max
            assert len(r[key]) == 5 and r[key] == sorted(r[key]) and r[key][0] > 0, (name, key)
        assert r["speedup_vs_hf_round_spread"][2] == pytest.approx(r["speedup_vs_hf_median_round"]), name
        assert r["cpu_ms_per_step"] > 0, name
        assert r["peak_memory_bytes"] > 0, name  # the process grew by at least the weights
        assert math.isfinite(r["final_loss"]) and 0 < r["final_loss"] < 20, name
        assert r["mfu"] is None  # no peak FLOP/s known on CPU unless --peak-tflops is given
    assert record["results"]["hf"]["speedup_vs_hf"] == 1.0
    # Both count the same unique parameters (the tied decoder once); tiny's vocab needs no padding.
    assert record["results"]["ours"]["parameters"] == record["results"]["hf"]["parameters"]
    assert (tmp_path / "train_throughput.png").stat().st_size > 0


@pytest.mark.gpu
def test_gpu_bench_path_runs_on_a_tiny_model(tmp_path):
    """The CUDA path (bf16 autocast, fused AdamW, torch.compile, allocator peaks, MFU) on a tiny model."""
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--case", "gpu-base", "--preset", "tiny",
           "--seq-len", "128", "--steps", "2", "--warmup", "2", "--rounds", "2", "--micro-batch", "4",
           "--peak-tflops", "100", "--no-plot", "--out-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / "train_throughput_gpu-base-tiny.json").read_text())
    assert record["device"]["type"] == "cuda" and record["settings"]["precision"] == "bf16-autocast"
    assert set(record["results"]) == {"hf", "ours+compile", "ours"}
    for name, r in record["results"].items():
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0, name
        assert 0 < r["mfu"] < 1 and math.isfinite(r["final_loss"]), name
