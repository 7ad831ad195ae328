"""Checkpoints at optimizer-step boundaries, and a checkpoint then a Slurm requeue on SIGUSR1/SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}

from roberta_pl.callbacks.steps import StepBoundary


class StepCheckpoint(ModelCheckpoint, StepBoundary):
    """Lightning's ModelCheckpoint, saving only at optimizer-step boundaries.

    ModelCheckpoint decides on ``global_step % every_n_train_steps`` at every micro-batch and does not restore
    which step it saved last. So the first micro-batch after a restore at step k (still step k: the window is
    not complete) saved ``step-k-v1.ckpt`` and ``last.ckpt`` with one more micro-batch consumed, the step-k
    weights and no accumulated gradient, and a resume from it lost that micro-batch's gradient. Here every
    save hook (the step trigger, the re-save of ``last`` after validation, train and epoch end, exceptions)
    runs only right after a batch that stepped the optimizer, or before any batch."""

    def __init__(self, **kwargs: Any) -> None:
        ModelCheckpoint.__init__(self, **kwargs)
        StepBoundary.__init__(self)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        StepBoundary.on_train_batch_start(self, trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        StepBoundary.on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx)
        if self.at_boundary:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_boundary:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_boundary:
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_boundary:
            super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.at_boundary:
            super().on_exception(trainer, pl_module, exception)


class RequeueOnSignal(StepBoundary):
    """Slurm's warning signal (``#SBATCH --signal=SIGUSR1@90``): finish the optimizer step in progress, save
    ``last.ckpt`` at that boundary, requeue the job (rank 0 runs ``scontrol requeue``) and stop.

    It replaces Lightning's auto-requeue, which saves from inside the signal handler, wherever the process
    is: between two micro-batches of an accumulation window, or in the middle of backward. Here the handler
    only raises a flag. Ranks may get the signal at different micro-batches, so at each step boundary they
    agree (one boolean all-reduce) and all save and stop at the same step. Outside Slurm the same signal
    checkpoints and stops the run (``kill -USR1 <pid>``), without a requeue.

    Args:
        last_path: where the checkpoint goes (the run's ``checkpoints/last.ckpt``).
        signum: the signal to act on.
    """

    def __init__(self, last_path: str | os.PathLike, signum: int = signal.SIGUSR1) -> None:
        super().__init__()
        self.last_path = Path(last_path)
        self.signum = signum
        self.signalled = False
        self.stopped_at: int | None = None  # the step saved when the signal stopped the run
        self.requeue_job: str | None = None  # rank 0 under Slurm: the job to requeue once the run has ended
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._previous = signal.signal(self.signum, self._handle)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.at_boundary:
            return
        signalled = self.signalled
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled:
            return
        trainer.save_checkpoint(self.last_path, weights_only=False)  # a full, resumable checkpoint
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        # The requeue itself waits until the run has ended (harness.run_scope): a requeue ends every process of
        # the job at once, W&B's writer included, which would lose what it had not yet written.
        self.requeue_job = job if trainer.is_global_zero else None
        if trainer.is_global_zero:
            print(f"Signal {signal.Signals(self.signum).name}: saved {self.last_path} at step {trainer.global_step}"
                  + (f"; requeueing Slurm job {job} once the run has closed its logs" if job else "; stopping"), flush=True)


def requeue_slurm_job(job: str) -> None:
    """``scontrol requeue JOB``: Slurm ends the job's processes and queues it again under the same id."""
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed: {(done.stderr or done.stdout).strip()}")


