"""Distributed correctness on CPU with real processes (gloo): DDP equals accumulation equals one large micro-batch,
on fairseq's objective; ranks see disjoint data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_equivalence_job import GLOBAL, STEPS, main, masked_rows, mean_ce_gradient

JOB = Path(__file__).resolve().parents[1] / "helpers" / "ddp_equivalence_job.py"


def _run(out: Path, devices: int, accumulation: int, micro: int, rows: Path) -> None:
    proc = subprocess.run([sys.executable, str(JOB), str(out), str(devices), str(accumulation), str(micro), str(rows)],
                          capture_output=True, text=True, timeout=300, cwd=JOB.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_every_split_of_the_global_batch_takes_the_same_steps_on_the_mean_masked_token_loss(
        tmp_path, shard_dir, tokenizer_dir):
    # Rows from the real pipeline in doc packing (padded) with span masking: micro-batches hold unequal numbers
    # of tokens and of masked tokens, the case where a per-micro-batch denominator changes the update.
    rows = masked_rows(shard_dir, tokenizer_dir, seq_len=64, pack_mode="doc", strategy="span")
    torch.save(rows, tmp_path / "rows.pt")
    real = rows["attention_mask"].sum(1)
    masked = (rows["labels"] != -100).sum(1)
    assert real.min() < 64 and len(set(masked.view(-1, 4).sum(1).tolist())) > 3, (real, masked)
    # The same global batch of 16 sequences: 2 ranks x accumulation 2 x micro 4, 1 x 4 x 4, 1 x 1 x 16.
    splits = {"ddp": (2, 2, 4), "accumulation": (1, 4, 4), "one_batch": (1, 1, 16)}
    for name, (devices, accumulation, micro) in splits.items():
        if devices > 1:  # real processes; one process runs here, in the test's
            _run(tmp_path / name, devices, accumulation, micro, tmp_path / "rows.pt")
        else:
            main(str(tmp_path / name), devices, accumulation, micro, str(tmp_path / "rows.pt"))
    init = torch.load(tmp_path / "ddp" / "init.pt", weights_only=True)
    # The first step's gradient is that of the cross-entropy averaged over all masked tokens of the global
    # batch (a denominator of mask_prob x tokens, or a mean of per-micro-batch means, is another gradient).
    expected = mean_ce_gradient(init, rows)
    for name in splits:
        gradient = torch.load(tmp_path / name / "first_gradient.pt", weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(gradient[k], v, rtol=1e-4, atol=1e-7, msg=f"{name}: {k}")
    final = {name: torch.load(tmp_path / name / "final.pt", weights_only=True) for name in splits}
    assert max((final["ddp"][k] - init[k]).abs().max().item() for k in init) > 1e-3  # it trained
    for name in ("accumulation", "one_batch"):
        for k, v in final["ddp"].items():
            torch.testing.assert_close(final[name][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    rank0, rank1 = (set(json.loads((tmp_path / "ddp" / f"rows-rank{r}.json").read_text())) for r in (0, 1))
    single = set(json.loads((tmp_path / "accumulation" / "rows-rank0.json").read_text()))
    assert rank0.isdisjoint(rank1) and rank0 | rank1 == single == set(range(GLOBAL * STEPS))


@pytest.mark.slow
def test_two_rank_tokens_per_second_agrees_with_tokens_trained_over_wall_time(tmp_path, shard_dir, tokenizer_dir):
    # 2 gloo ranks x accumulation 4 x micro-batch 2 through the real entry point, TensorBoard events (each scalar
    # carries the wall time it was written at). Not a speed assertion: two of the run's own figures must agree.
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_pretrain import TINY

    data = [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", *TINY, *data, "trainer.devices=2", "trainer.strategy=ddp",
           "batch.micro_batch_size=2", "batch.global_batch_size=16", "trainer.max_steps=8", "logger=tensorboard",
           "trainer.val_every_n_steps=1000", "checkpoint.every_n_steps=1000", "export_hf=false", f"run_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(next((tmp_path / "tensorboard").glob("version_*")))).Reload()
    rates, trained = events.Scalars("perf/tokens_per_sec"), events.Scalars("perf/tokens_trained")
    assert [e.step for e in rates] == [e.step for e in trained] == list(range(1, 9))
    # Full-sentences blocks have no padding: every step trains the global batch, 16 x 64 tokens, over both
    # ranks and all 4 micro-batches of the window.
    assert [e.value for e in trained] == [16 * 64 * step for step in range(1, 9)]
    first, last = trained[0], trained[-1]
    overall = (last.value - first.value) / (last.wall_time - first.wall_time)
    # Each logged figure is its window's tokens over its window's time; over windows of equal tokens, the
    # harmonic mean of the figures is total tokens over total time, whatever the spread of step times.
    logged = len(rates[1:]) / sum(1 / e.value for e in rates[1:])
    assert abs(logged / overall - 1) < 0.15, (logged, overall, [e.value for e in rates])
