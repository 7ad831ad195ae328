"""Callbacks for pretraining: throughput/MFU, the loss history, step-boundary checkpoints, the batch and validation
schedules, resume on another data plan, the fault monitors (non-finite loss, fp16 loss-scale collapse, skipped
data) and the progress bars."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from rich.progress import ProgressColumn, Task
from rich.text import Text

from roberta_pl.lightning_compat import (
    DescribedProgressBar,
    is_logging_step,
    is_rich_time_column,
    last_saved_step,
    micro_batches_started,
    refresh_progress_metrics,
    set_max_steps,
    set_progress,
    set_resumed_batch_progress,
    set_val_check_batch,
    start_train_progress,
)
from roberta_pl.errors import TrainingFault
from roberta_pl.model import IGNORE_INDEX
from roberta_pl.optim import budget_max_steps, micro_batches_before
from roberta_pl.outputs import write_loss_curve

_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}


class StepBoundary(pl.Callback):
    """Knows whether the last training batch completed an optimizer step (``at_boundary``).

    With gradient accumulation, only the last micro-batch of a window steps the optimizer. A checkpoint taken
    anywhere else records data as consumed whose gradient it does not hold, and a resume from it silently
    drops that gradient; a figure logged anywhere else is logged once per micro-batch. A fresh or restored run
    is at a boundary."""

    def __init__(self) -> None:
        self.at_boundary = True
        self._step_before = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.at_boundary = trainer.global_step != self._step_before

    def logs_now(self, trainer: pl.Trainer) -> bool:
        """In ``on_train_batch_end``: this batch completed an optimizer step whose metrics go to the loggers."""
        return self.at_boundary and is_logging_step(trainer)


class ThroughputLogger(StepBoundary):
    """Tokens/s and MFU over each logging window, once per logged optimizer step.

    Lightning's ThroughputMonitor synchronises the device after every batch; this one counts tokens on the
    device (no sync) and synchronises only when it logs. Tokens are real tokens (padding of doc-mode batches
    excluded), summed over every rank with one all-reduce: ``perf/tokens_per_sec`` is the run's,
    ``perf/tokens_per_sec_per_device`` that over the ranks, ``perf/tokens_trained`` the running total (saved
    in checkpoints; it counts up to the last logged step). MFU = model FLOPs per second per device / the device's
    peak for the training precision (None on CPU): the module's ``flops_per_position`` for every position computed
    (padding costs FLOPs too) plus its ``flops_per_prediction`` for every position the batch's labels predict (the
    sparse MLM head runs on those only), counted on the device like the tokens: the masking is the batch's, not a
    setting the module is told.
    """

    def __init__(self) -> None:
        super().__init__()
        self._real: torch.Tensor | int = 0  # real tokens since the last log (a device tensor in doc mode)
        self._positions = 0  # positions computed since the last log, padding included
        self._predicted: torch.Tensor | int = 0  # positions predicted (labels other than -100) since the last log
        self.tokens_trained = 0  # real tokens over all ranks up to the last logged step (kept across resumes)
        self._t0: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = _PRECISION_DTYPE.get(str(trainer.precision), torch.float32)
        self._peak = get_available_flops(pl_module.device, dtype) if pl_module.device.type == "cuda" else None
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        self._positions += ids.numel()  # from the shape: free
        self._real = self._real + (mask.sum() if mask is not None else ids.numel())  # on the device: no sync
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor):
            self._predicted = self._predicted + (labels != IGNORE_INDEX).sum()
        if not self.logs_now(trainer):
            return
        counts = torch.stack([torch.as_tensor(self._real, device=ids.device).to(torch.float64),
                              torch.tensor(float(self._positions), dtype=torch.float64, device=ids.device),
                              torch.as_tensor(self._predicted, device=ids.device).to(torch.float64)])
        self._real, self._positions, self._predicted = 0, 0, 0
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        tokens, positions, predicted = (float(x) for x in counts.cpu())  # the sync, once per logged step
        now = time.perf_counter()
        elapsed, self._t0 = max(now - self._t0, 1e-9), now
        self.tokens_trained += int(tokens)
        metrics = {"perf/tokens_per_sec": tokens / elapsed,
                   "perf/tokens_per_sec_per_device": tokens / elapsed / trainer.world_size,
                   "perf/tokens_trained": float(self.tokens_trained)}
        flops = model_flops(pl_module, positions, predicted)
        if self._peak and flops:
            metrics["perf/mfu"] = flops / elapsed / trainer.world_size / self._peak
        pl_module.log_dict(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_trained": self.tokens_trained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_trained = int(state_dict.get("tokens_trained", 0))


def model_flops(pl_module: pl.LightningModule, positions: float, predicted: float) -> float:
    """Training FLOPs of ``positions`` computed positions of which ``predicted`` were predicted, by the module's own
    figures (``flops_per_position``, ``flops_per_prediction``; 0 for a module that has none)."""
    return (positions * getattr(pl_module, "flops_per_position", 0.0)
            + predicted * getattr(pl_module, "flops_per_prediction", 0.0))


class LossCurve(StepBoundary):
    """Records train/val loss and accuracy at logging steps and draws ``loss_curve.png`` at the end.

    Its history is part of the checkpoint (``state_dict``), so a resumed run continues the same curve
    without duplicated training points. Lightning saves a step's checkpoint before that step's validation,
    so a run resumed from step k lacks the validation point at k.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.logs_now(trainer) and "train/loss" in trainer.callback_metrics:
            self.history.append({"step": trainer.global_step, "train_loss": float(trainer.callback_metrics["train/loss"])})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" in m:
            self.history.append({"step": trainer.global_step, "val_loss": float(m["val/loss"]),
                                 "val_accuracy": float(m.get("val/accuracy", float("nan")))})

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            write_loss_curve(self.history, self.out_dir)


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


class BatchRamp(pl.Callback):
    """Grows the global batch during training by switching gradient accumulation at optimizer-step boundaries.

    Args:
        phases: ``(start_step, start_micro_batch, accumulation)`` from :func:`roberta_pl.optim.plan_ramp`.
            Phase starts are aligned to whole optimizer steps by construction, so every step sums exactly
            ``accumulation`` micro-batches.
    """

    def __init__(self, phases: list[tuple[int, int, int]]) -> None:
        self.phases = phases

    def accumulation_at(self, micro_batch: int) -> int:
        return [acc for _, start, acc in self.phases if start <= micro_batch][-1]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        micro = micro_batches_started(trainer) - 1
        trainer.accumulate_grad_batches = self.accumulation_at(micro)


class ValidationSchedule(pl.Callback):
    """Validates after every ``every_n_steps``-th optimizer step, also while a batch ramp changes the
    accumulation.

    Lightning counts validation intervals in micro-batches (``val_check_interval``). Under a ramp a fixed
    interval drifts off the optimizer steps (a ramp from 4 to 8 sequences validated at steps 4, 6, 8 instead
    of 2, 4, 6, 8). Before each micro-batch this sets the trainer's interval so that the check is true after
    exactly the last micro-batch of a step due for validation.

    Args:
        every_n_steps: validate after optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ...
        phases: ``(start_step, start_micro_batch, accumulation)`` from :func:`roberta_pl.optim.plan_ramp`.
    """

    def __init__(self, every_n_steps: int, phases: list[tuple[int, int, int]]) -> None:
        self.every_n_steps = every_n_steps
        self.phases = phases
        self.final_step: int | None = None  # also validate after this step (a time budget's last one)

    def step_completed_by(self, micro: int) -> int | None:
        """The optimizer step that micro-batch ``micro`` (0-based) completes, None if it is not a step's last."""
        start_step, start_micro, acc = [p for p in self.phases if p[1] <= micro][-1]
        done, rest = divmod(micro - start_micro + 1, acc)
        return start_step + done if rest == 0 else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        micro = micro_batches_started(trainer) - 1
        step = self.step_completed_by(micro)
        due = step is not None and (step % self.every_n_steps == 0 or step == self.final_step)
        # Lightning validates after micro-batch m when (m + 1) % val_check_batch == 0.
        set_val_check_batch(trainer, micro + 1 if due else micro + 2)


class StopAtStep(pl.Callback):
    """Ends ``fit`` after optimizer step ``step`` (checkpointed as usual) while the LR schedule still runs to
    ``max_steps``: split a long run into jobs that each fit a cluster time limit, then ``resume=auto``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class WorldSizeResume(pl.Callback):
    """Resume a checkpoint written under another data plan (another number of ranks, DataLoader workers or
    micro-batch size) with Lightning's micro-batch counters on this run's plan.

    The DataModule re-plans first (``MLMDataModule.replan``, from its ``load_state_dict``, which Lightning calls before
    this hook): its data position becomes this plan's. Lightning would restore its counters as saved, and its
    accumulation counts micro-batches within the epoch: a 2-rank checkpoint after 3 steps of accumulation 2 (6
    micro-batches) resumed on 1 rank with accumulation 4 would step after 2 micro-batches. Here the run has trained
    ``global_step x accumulation`` micro-batches of this plan, and is at the DataModule's place in its epoch. The step
    count, the LR schedule and the optimizer state are the checkpoint's, untouched.
    """

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        if not getattr(datamodule, "replanned", False):
            return
        per_epoch = datamodule.batches_per_epoch_per_rank
        in_epoch = datamodule.consumed - int(checkpoint["epoch"]) * per_epoch
        if not 0 <= in_epoch <= per_epoch:
            raise RuntimeError(f"the re-planned data position {datamodule.consumed} is not in the checkpoint's epoch "
                               f"{checkpoint['epoch']} ({per_epoch} batches per epoch)")
        set_resumed_batch_progress(checkpoint, int(checkpoint["global_step"]) * trainer.accumulate_grad_batches,
                                   in_epoch, {"consumed": datamodule.consumed})


class BudgetPlanner(StepBoundary):
    """Trains for a wall-clock budget (``trainer.max_time``) by fixing ``max_steps`` once, early in the run.

    Over the LR warm-up it times the training micro-batches of this process (validation excluded), then, at
    ``fix_step`` (or once 5% of the budget went into measuring, if sooner), fixes ``max_steps`` so that the rest
    of the budget holds the remaining steps, the validations due until then and one more for the end (the last
    step always validates). Under a mask-rate schedule the steps after the warm-up are counted cheaper, by the
    FLOPs the falling rate saves in the MLM head (:func:`falling_mask_cost`). From then on the run is a
    step-count run: the LR decays to the fixed step (the module's ``hparams.max_steps``, which the schedule
    reads), the mask-rate schedule's horizon is that step, and the figure is saved in the checkpoint
    (``state_dict``). A resume
    reuses it and does not measure again: it trains to the same step whatever time is left, exactly as the
    uninterrupted run. A run stopped before the figure was fixed measures afresh, with the budget it had
    not yet spent.

    The clock starts when the planner is built (with the Trainer: after data preparation, before the model is
    built and any checkpoint is loaded); the export after fit is not inside the budget.

    Args:
        seconds: the budget.
        phases: the batch plan's ``(start_step, start_micro_batch, accumulation)`` (a batch ramp's steps grow).
        warmup_steps: ``optim.warmup_steps``; the figure is fixed within it, so the LR and mask rates of the
            warm-up never depend on it (the scheduler computes step ``s + 1``'s LR at the end of step ``s``,
            and a step's batches are masked ahead of it).
        cap: ``trainer.max_steps``, which the budget never exceeds.
        val_every_n_steps: the validation interval, whose validations the budget must also hold.
    """

    def __init__(self, seconds: float, phases: list[tuple[int, int, int]], warmup_steps: int, cap: int,
                 val_every_n_steps: int) -> None:
        super().__init__()
        if warmup_steps < 4:
            raise ValueError(f"optim.warmup_steps={warmup_steps}: a time budget (trainer.max_time) measures the step "
                             f"rate inside the warm-up, which needs at least 4 steps")
        self.seconds = seconds
        self.phases = [tuple(p) for p in phases]
        self.cap = cap
        self.val_every_n_steps = val_every_n_steps
        self.warmup_steps = warmup_steps
        # Fixed at step `fix_step`, at most warmup - 2: the batch prefetched at that point is still in the warm-up.
        self.fix_step = min(warmup_steps // 2, 100)
        self.measure_from = min(max(1, self.fix_step // 4), 5)  # the first steps pay for allocation, compilation
        self.max_steps: int | None = None  # the fixed figure (in the checkpoint)
        self.spent = 0.0  # budget seconds spent by earlier jobs of this run before the figure was fixed
        self.measured: dict[str, float] = {}
        self.clock = time.monotonic  # this rank's clock (tests skew it)
        self._clock = self.clock()
        self._mark: tuple[float, int, float, int] | None = None  # (time, micro-batch, validation s, step)
        self._val_seconds = 0.0
        self._val_batches = 0
        self._val_start: float | None = None

    def elapsed(self) -> float:
        """Budget seconds spent so far, earlier jobs of this run included."""
        return self.spent + self.clock() - self._clock

    # validation time is measured apart: it is not part of a training step's rate
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = self.clock()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_batches += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._val_seconds += self.clock() - self._val_start
            self._val_start = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.max_steps is not None:  # resumed after the figure was fixed: the same run from here on
            self._apply(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.max_steps is not None or not self.at_boundary:
            return
        step, now = trainer.global_step, self.clock()
        if self._mark is None:
            if step >= self.measure_from:
                self._mark = (now, micro_batches_started(trainer), self._val_seconds, step)
            return
        t0, micro0, val0, step0 = self._mark
        # At fix_step, or earlier once 5% of the budget went into measuring (a short budget on a slow machine). Each
        # rank has its own clock, and the broadcast below is a collective: were one rank to decide a step before the
        # others, its broadcast would meet their gradient all-reduce (a hang, or garbage exchanged). So before
        # fix_step, a step number every rank shares, the ranks agree (one boolean all-reduce a step, only in the
        # measuring window): when any rank's clock says so, all fix at this step.
        if step < self.fix_step:
            early = step > step0 and now - t0 >= 0.05 * self.seconds
            if trainer.world_size > 1:
                early = trainer.strategy.reduce_boolean_decision(early, all=False)
            if not early:
                return
        micro = micro_batches_started(trainer)
        per_micro = max(now - t0 - (self._val_seconds - val0), 1e-9) / max(1, micro - micro0)
        # A validation batch is a forward pass only: about a third of a training micro-batch, until one is timed.
        per_val = self._val_seconds / self._val_batches if self._val_batches else per_micro / 3
        batches = sum(trainer.num_val_batches) if trainer.val_dataloaders is not None else 0
        per_validation = per_val * (batches if math.isfinite(batches) else 0)
        left = self.seconds - self.elapsed()
        ratio = falling_mask_cost(trainer, pl_module)
        cheaper = None if ratio is None else (self.warmup_steps, ratio)
        max_steps = budget_max_steps(self.phases, step, left - per_validation, per_micro, self.cap, cheaper)
        for _ in range(2):  # the validations due before the last step take their share of the budget
            validations = max_steps // self.val_every_n_steps - step // self.val_every_n_steps
            max_steps = budget_max_steps(self.phases, step, left - (validations + 1) * per_validation, per_micro,
                                         self.cap, cheaper)
        if trainer.world_size > 1:  # every rank must stop at the same step: rank 0's measurement decides
            max_steps = int(trainer.strategy.broadcast(max_steps, src=0))
        self.max_steps = max_steps
        self.measured = {"seconds_per_micro_batch": per_micro, "seconds_per_validation": per_validation,
                         "measured_from_step": step0, "fixed_at_step": step, "seconds_left": left,
                         "cost_after_warmup": 1.0 if ratio is None else ratio}
        self._apply(trainer, pl_module)
        if trainer.is_global_zero:
            falling = "" if ratio is None or abs(ratio - 1) < 5e-3 else \
                f" ({ratio:.2f}x that after the warm-up, at the mask schedule's mean rate)"
            print(f"Time budget {_clock(self.seconds)}: {per_micro * 1e3:.1f} ms a micro-batch over steps {step0}-{step}"
                  f"{falling}, {_clock(left)} left -> trainer.max_steps fixed at {max_steps:,} (the LR decays to it; "
                  f"a resume trains to it)", flush=True)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the run a step-count run of ``self.max_steps``: the loop, the LR schedule, the mask-rate
        schedule (shared with the DataLoader workers) and the final validation."""
        set_max_steps(trainer, self.max_steps)
        if "max_steps" in pl_module.hparams:  # what MaskedLMModule's LR schedule reads at every step
            pl_module.hparams.max_steps = self.max_steps
        schedule = getattr(trainer.datamodule, "mask_schedule", None)
        if schedule is not None:
            schedule.set_horizon(micro_batches_before(self.phases, self.max_steps))
        for callback in trainer.callbacks:
            if isinstance(callback, ValidationSchedule):
                callback.final_step = self.max_steps

    def state_dict(self) -> dict[str, Any]:
        spent = self.elapsed() if self.max_steps is None else self.spent
        return {"max_steps": self.max_steps, "seconds": self.seconds, "spent": spent, "measured": dict(self.measured)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("max_steps")
        self.max_steps = None if saved is None else int(saved)
        self.spent = float(state_dict.get("spent", 0.0))
        self.measured = dict(state_dict.get("measured") or {})


def falling_mask_cost(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """What a micro-batch costs after the warm-up, on average, against one of the warm-up, under a mask-rate
    schedule (None without one, or without the module's FLOPs figures).

    The rate falls linearly from ``start`` (held through the warm-up, where the planner measures) to ``end`` at the
    last step, so the mean rate after the warm-up is their midpoint whatever the step count; the micro-batch's
    work is the encoder's over every position plus the MLM head's over the masked ones. For ``tiny`` at 30% ->
    15%: 0.90 (the quickstart's micro-batches measured 0.86 of the warm-up's, so the budget still ends a little
    early); for ``base`` the head's share is smaller and so is the correction.
    """
    schedule = getattr(trainer.datamodule, "mask_schedule", None)
    per_position = getattr(pl_module, "flops_per_position", 0.0)
    per_prediction = getattr(pl_module, "flops_per_prediction", 0.0)
    if schedule is None or per_position <= 0:
        return None
    mean = (schedule.start + schedule.end) / 2
    return (per_position + mean * per_prediction) / (per_position + schedule.start * per_prediction)


def fixed_max_steps(checkpoint: dict) -> int | None:
    """The ``max_steps`` a time-budgeted run fixed, from its checkpoint (None: not a budget run, or not fixed yet)."""
    state = (checkpoint.get("callbacks") or {}).get(BudgetPlanner.__qualname__) or {}
    return None if state.get("max_steps") is None else int(state["max_steps"])


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# -- faults ------------------------------------------------------------------------------------------
def _scaler(trainer: pl.Trainer):
    """The fp16 GradScaler of a 16-mixed run, None otherwise (bf16 and fp32 need none; DeepSpeed has its own)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _deepspeed_engine(trainer: pl.Trainer):
    """The DeepSpeed engine of a DeepSpeed run, None otherwise."""
    return getattr(trainer.strategy, "deepspeed_engine", None)


def _loss_scale(trainer: pl.Trainer) -> float | None:
    """The fp16 loss scale now: Lightning's GradScaler under 16-mixed (a sync), DeepSpeed's own loss scaler under
    DeepSpeed fp16 (a Python float); None without fp16 loss scaling. Both skip a step whose gradients overflow."""
    scaler = _scaler(trainer)
    if scaler is not None:
        return scaler.get_scale() if scaler.is_enabled() else None
    engine = _deepspeed_engine(trainer)
    return float(engine.loss_scale()) if engine is not None and engine.fp16_enabled() else None


def _scales_loss(trainer: pl.Trainer) -> bool:
    """fp16 loss scaling is on, by Lightning's GradScaler or by DeepSpeed: overflow steps are the scaler's to skip."""
    if _scaler(trainer) is not None:
        return True
    engine = _deepspeed_engine(trainer)
    return engine is not None and engine.fp16_enabled()


class NonFiniteLossGuard(pl.Callback):
    """Acts on a NaN/inf training loss before it reaches the parameters.

    The loss of each micro-batch is folded into one on-device flag (no sync), read once per optimizer
    step, before the update. ``stop`` raises :class:`TrainingFault` naming the step: the parameters were
    not touched, and the last checkpoint is kept. ``skip`` drops the step's gradients, so the optimizer
    leaves parameters and moments as they were, counts the skip (``train/skipped_steps``) and trains on;
    the step's batches count as consumed, so data order stays exact. Under fp16 loss scaling (16-mixed, or
    DeepSpeed's fp16), overflow steps are the loss scaler's to skip (see :class:`LossScaleMonitor`), so the guard
    stands aside.

    Under DeepSpeed, Lightning calls the optimizer step (DeepSpeed's engine decides whether it is a real one) and
    with it ``on_before_optimizer_step`` after every micro-batch: the guard acts only at the engine's
    accumulation boundary, so it reads and reduces its flag once per optimizer step there too. DeepSpeed's engine
    has no way to drop an accumulated step outside fp16, so ``skip`` is refused with DeepSpeed at other precisions
    (``roberta_pl.checks.preflight``); ``stop`` raises before the engine steps.

    Args:
        policy: ``"stop"`` or ``"skip"``.
    """

    def __init__(self, policy: str = "stop") -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"trainer.nonfinite_loss={policy}: choose stop or skip")
        self.policy = policy
        self.skipped = 0
        self._bad: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not _scales_loss(trainer):
            bad = ~torch.isfinite(loss.detach())
            self._bad = bad if self._bad is None else self._bad | bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        engine = _deepspeed_engine(trainer)
        if engine is not None and not engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed: a micro-batch inside the window; the flag is read at the window's last one
        if _scales_loss(trainer):  # the loss scaler skips overflow steps on every rank alike
            self._bad = None
            return
        bad, self._bad = self._bad, None
        step = trainer.global_step + 1  # the step being taken; checkpoints are named by completed steps
        bad = bad is not None and bool(bad)  # the one sync per optimizer step
        if trainer.world_size > 1:
            # Gradients are all-reduced, so one rank's NaN is every rank's: all ranks must skip (or stop)
            # together, or the others would step on NaN gradients (or wait for a rank that has left).
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            saved = last_saved_step(trainer)
            if self.policy == "stop":
                raise TrainingFault(
                    f"non-finite training loss (NaN/inf) at step {step}; stopped before updating the parameters "
                    f"(last checkpoint: step {saved or 0}); set trainer.nonfinite_loss=skip to skip such steps")
            optimizer.zero_grad(set_to_none=True)  # no gradients: AdamW leaves parameters and moments alone
            self.skipped += 1
            rank_zero_warn(f"skipped step {step}: non-finite training loss (trainer.nonfinite_loss=skip); "
                           f"{self.skipped} skipped so far")
        if is_logging_step(trainer) or self.skipped:
            pl_module.log("train/skipped_steps", float(self.skipped))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class LossScaleMonitor(pl.Callback):
    """Reports the fp16 loss scale and stops when it collapses.

    The GradScaler halves the scale on every step whose gradients overflow and skips that step. A rare
    overflow is normal; a scale driven below ``min_scale`` means step after step overflowed: the loss is
    diverging and training has silently stopped learning. Logs ``train/loss_scale`` on logging steps,
    and raises :class:`TrainingFault` naming the step and scale. Reads Lightning's GradScaler (16-mixed) or
    DeepSpeed's loss scaler (DeepSpeed fp16, which skips overflow steps the same way); inert without either.

    Args:
        min_scale: the floor (fairseq's ``--min-loss-scale``, 1e-4 by default).
    """

    def __init__(self, min_scale: float = 1e-4) -> None:
        self.min_scale = min_scale
        self.overflows = 0  # consecutive optimizer steps the scaler skipped
        self._previous: float | None = None
        self._seen_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scale = _loss_scale(trainer)
        if scale is not None:
            self._previous, self._seen_step = scale, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._seen_step or not _scales_loss(trainer):
            return  # no fp16, or still accumulating: the scale changes only when a step is taken
        self._seen_step = trainer.global_step
        scale = _loss_scale(trainer)  # GradScaler: a sync, as the scaler makes one per step to decide skips
        previous, self._previous = self._previous, scale
        if previous is not None and scale < previous:
            self.overflows += 1
            rank_zero_warn(f"step {trainer.global_step}: fp16 gradients overflowed, step skipped; "
                           f"loss scale {previous:g} -> {scale:g}")
        else:
            self.overflows = 0
        if is_logging_step(trainer):
            pl_module.log("train/loss_scale", float(scale))
        if scale < self.min_scale:
            raise TrainingFault(
                f"fp16 loss scale collapsed to {scale:g} at step {trainer.global_step} (below trainer.min_loss_scale="
                f"{self.min_scale:g}; {self.overflows} consecutive overflow steps skipped): the loss is diverging; "
                f"lower optim.lr, lengthen warm-up, or use trainer.precision=bf16-mixed")


class DataSkipMonitor(StepBoundary):
    """Logs ``data/skipped_shards``: bad shard reads that ``data.on_error=skip`` stepped over (each is also
    a warning in the log naming the shard). Counts come from the DataModule, DataLoader workers included,
    summed over ranks."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        counts = getattr(trainer.datamodule, "skipped_shards", None)
        if counts is not None and self.logs_now(trainer):
            # Summed over ranks (each rank streams its own shards); every rank logs on the same steps.
            pl_module.log_dict({f"data/skipped_shards_{split}": float(n) for split, n in counts().items()},
                               sync_dist=True, reduce_fx="sum")


class RunProgressBar(DescribedProgressBar):
    """Lightning's Rich progress bar without the logger's version number (``v_num``): the base of both entry
    points' bars."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number is not a training metric
        return metrics


class EpochProgressBar(RunProgressBar):
    """Fine-tuning's progress bar: one bar per pass over the training set, read as "Epoch 2/3" (counted from one;
    Lightning's own read "Epoch 1/2" there), with the validation metric that picks the best checkpoint shown even
    when the module does not put it on the bar (``val/mcc``, ``val/spearman``).

    Args:
        monitor: the monitored metric, e.g. ``val/f1``.
    """

    def __init__(self, monitor: str) -> None:
        super().__init__()
        self.monitor = monitor

    def train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs  # -1 (or None) when trainer.max_steps alone bounds the run
        text = f"Epoch {current_epoch + 1}" + (f"/{epochs}" if epochs is not None and epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            metrics.setdefault(self.monitor, float(value))
        return metrics


class StepProgressBar(RunProgressBar):
    """Rich progress over the whole run in optimizer steps (``step 420/2000``).

    Pretraining streams shards with no fixed epoch: Lightning's per-epoch micro-batch bar would show an
    epoch count of "-2" (``max_epochs=-1``) and a batch total the stream cannot know exactly.

    Elapsed time is this process's training time, from the start of fit (after a resume, from the resume:
    like the steps it shows, it counts what this process did), and the time left is the steps left at this
    process's step rate. Lightning's time column timed the train task from its last (re)start, which is
    every epoch: a 5-minute run of short stream epochs showed 0:00:34.
    """

    train_started: float | None = None  # time.monotonic() when this process began training
    steps_before: int = 0  # optimizer steps done before this process began (a resume's step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.train_started, self.steps_before = time.monotonic(), trainer.global_step

    def configure_columns(self, trainer: pl.Trainer) -> list:
        return [_RunTimeColumn(self, column) if is_rich_time_column(column) else column
                for column in super().configure_columns(trainer)]

    def run_times(self) -> tuple[float, float | None] | None:
        """(elapsed, remaining) seconds of this process's training, None before it starts; remaining is None
        until a step is done or without a step total."""
        if self.train_started is None:
            return None
        elapsed = time.monotonic() - self.train_started
        done, total = self.trainer.global_step - self.steps_before, self.total_train_batches
        left = None if done <= 0 or not math.isfinite(total) else (total - self.trainer.global_step) * elapsed / done
        return elapsed, left

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")

    def train_description(self, current_epoch: int) -> str:
        return f"{'Steps':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        set_progress(self, self.train_progress_bar_id, trainer.global_step)  # no reset to 0 at an epoch boundary

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            start_train_progress(self)
        set_progress(self, self.train_progress_bar_id, trainer.global_step)
        refresh_progress_metrics(self, trainer, pl_module)


class _RunTimeColumn(ProgressColumn):
    """Lightning's "elapsed • remaining" column, with the train task timed by :meth:`StepProgressBar.run_times`
    (validation bars keep their own times)."""

    max_refresh = 0.5  # as Lightning's: twice a second, without jitter

    def __init__(self, bar: StepProgressBar, column: ProgressColumn) -> None:
        super().__init__()
        self.bar, self.column = bar, column

    def render(self, task: Task) -> Text:
        times = self.bar.run_times() if task.id == self.bar.train_progress_bar_id else None
        if times is None:
            return self.column.render(task)
        shown = [str(timedelta(seconds=int(t))) if t is not None else "-:--:--" for t in times]
        return Text(" • ".join(shown), style=self.column.style)
