"""Memory that must not grow through training: DataLoader worker processes alive between validations.

bench/memory_growth.py measures the run's RSS over thousands of steps; this test checks, on a real short run, one
cause it found that a count can show without timing: the processes holding memory."""

from __future__ import annotations

import lightning.pytorch as pl
import psutil
from test_pretrain import TINY, compose_cfg

from roberta_pl.pretraining.app import run

WORKERS_SEEN: list[tuple[int, int]] = []  # (optimizer step, live DataLoader worker processes) after each step


def loader_workers() -> int:
    """Live DataLoader workers of this process: forked children, so they share its command line (the multiprocessing
    resource tracker, a spawned child, does not)."""
    me = psutil.Process()
    cmdline = me.cmdline()
    count = 0
    for child in me.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and child.cmdline() == cmdline:
                count += 1
        except psutil.NoSuchProcess:
            pass
    return count


class CountWorkers(pl.Callback):
    """Records the live DataLoader workers after every optimizer step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        WORKERS_SEEN.append((trainer.global_step, loader_workers()))


def test_validation_workers_do_not_outlive_their_validation(tmp_path, shard_dir, tokenizer_dir, reliability):
    # One worker per loader, validating every 2 steps on 2 of the validation stream's batches (so that stream never
    # ends). Between validations only the train loader's worker may be alive: the validation's own worker, a forked
    # copy of the trainer, used to idle until the next validation, its copy-on-write pages becoming its own.
    WORKERS_SEEN.clear()
    overrides = [*TINY, f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}",
                 f"data.tokenizer={tokenizer_dir}", "data.num_workers=1", "trainer.max_steps=5",
                 "trainer.val_every_n_steps=2", "trainer.limit_val_batches=2", "export_hf=false", "logger=none",
                 "checkpoint.every_n_steps=100", "trainer.callbacks=[{_target_:test_memory.CountWorkers}]"]
    summary = run(compose_cfg(overrides), tmp_path, overrides=overrides)
    assert summary["global_step"] == 5
    after_validation = [(step, n) for step, n in WORKERS_SEEN if step > 2]
    assert after_validation, WORKERS_SEEN
    assert all(n <= 1 for _, n in after_validation), (
        f"DataLoader workers alive after each optimizer step (step, workers): {WORKERS_SEEN}; one is the train loader's")
    assert loader_workers() == 0  # and none once the run has ended
    reliability("idle-validation-workers",
                happened="validation read 2 batches of its stream every 2 steps with 1 DataLoader worker",
                kept=f"between validations only the train loader's worker was alive ({after_validation})")
