"""Kill and resume in packed_docs: SIGKILL a real `roberta-pl-train` process at two random steps; the rerun ends bit
for bit where an uninterrupted packed_docs run ends, having trained on exactly the same batches (the resume seeks by
the token arithmetic of the framed documents, as in full_sentences)."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from reliability_faults import surviving_batches
from test_reliability_kill import (
    KILL_SEED,
    MAX_STEPS,
    assert_same_state,
    finish,
    load,
    recorder,
    saved_steps,
    start,
    train_command,
)

pytestmark = pytest.mark.slow

PACKED = "data.packing=packed_docs"


def test_sigkill_at_two_random_steps_resumes_exactly_in_packed_docs(tmp_path, shard_dir, tokenizer_dir):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_dir.mkdir()
    killed_dir.mkdir()
    straight = start([*train_command(straight_dir, shard_dir, tokenizer_dir, recorder(straight_dir / "b.jsonl")), PACKED],
                     straight_dir / "log.txt")
    cmd = [*train_command(killed_dir, shard_dir, tokenizer_dir, recorder(killed_dir / "b.jsonl")), PACKED]
    kills = sorted(random.Random(KILL_SEED + 1).sample(range(2, MAX_STEPS - 1), 2))
    for step in kills:
        proc = start(cmd, killed_dir / "log.txt")
        while not (saved_steps(killed_dir) and saved_steps(killed_dir)[-1] >= step):
            assert proc.poll() is None, f"finished before the kill at step {step}"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finish(start(cmd, killed_dir / "log.txt"), killed_dir / "log.txt")
    finish(straight, straight_dir / "log.txt")
    assert (killed_dir / "log.txt").read_text().count("Resuming from") == len(kills)
    expected, got = load(straight_dir / "checkpoints" / "last.ckpt"), load(killed_dir / "checkpoints" / "last.ckpt")
    assert got["global_step"] == MAX_STEPS and got["MLMDataModule"]["pack_mode"] == "packed_docs"
    assert_same_state(expected, got)
    batches, expected_batches = surviving_batches(killed_dir / "b.jsonl"), surviving_batches(straight_dir / "b.jsonl")
    assert list(batches) == list(range(got["MLMDataModule"]["consumed"]))
    assert [b["batch"] for b in batches.values()] == [b["batch"] for b in expected_batches.values()]
