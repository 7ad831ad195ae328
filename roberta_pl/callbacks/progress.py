"""The progress bars: optimizer steps (pretraining) or epochs (fine-tuning), with the run's own time column."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from rich.progress import ProgressColumn, Task
from rich.text import Text

from roberta_pl.batch_plan import StepHorizon
from roberta_pl.lightning_compat import (
    DescribedProgressBar,
    is_rich_time_column,
    refresh_progress_metrics,
    set_progress,
    start_train_progress,
)


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
        total = self.total_train_batches
        if self.progress is not None and self.train_progress_bar_id is not None and math.isfinite(total) and \
                self.progress.tasks[self.train_progress_bar_id].total != total:  # a time budget fixed or re-planned it
            self.progress.update(self.train_progress_bar_id, total=total)
        set_progress(self, self.train_progress_bar_id, trainer.global_step)
        refresh_progress_metrics(self, trainer, pl_module)


class ProgressLog(ProgressBar):
    """Pretraining's progress where stdout is not a terminal (a pipe, a batch job's log file), where a Rich bar
    draws nothing until the end: one line every ``every_seconds`` of training and after each validation, with the
    step out of the run's total (a time budget's figure once fixed), the loss, the time a training step took since
    the last line (validation timed apart), this process's time and the time left: the steps left at that recent
    rate (a machine's speed changes; the average since the start would lag it) and the validations still due
    (``val_every_n_steps``) at the last one's time::

        step 1,250/3,104 (40%) | train/loss 5.812 | val/loss 5.790 | 95.3 ms/step | 0:02:01 elapsed, 0:02:57 left

    A progress bar to Lightning (it replaces the Rich one; rank 0 alone prints). ``horizon``: the run's step horizon;
    until a time budget fixes it the lines show no total (the configured ``trainer.max_steps`` is only a cap).
    ``validate_last``: the last step validates too (a time budget's). ``clock``: what times it (seconds)."""

    def __init__(self, every_seconds: float = 30.0, horizon: StepHorizon | None = None,
                 val_every_n_steps: int | None = None, validate_last: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock  # tests drive it by the step
        self.every_seconds = every_seconds
        self.horizon = horizon
        self.val_every_n_steps = val_every_n_steps
        self.validate_last = validate_last
        self._val_started: float | None = None
        self._val_seconds = 0.0  # validation time since the last line
        self._last_validation = 0.0  # how long the last validation took
        self._enabled = True
        self._started: float | None = None
        self._steps_before = 0
        self._last_line = 0.0
        self._last_step = 0
        self._per_step = 0.0  # seconds a training step took, at the last line

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def total_train_batches(self) -> int | float:
        if self.horizon is not None and not self.horizon.fixed:
            return float("inf")
        return self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last_line = self.clock()
        self._steps_before = self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.clock() - self._last_line >= self.every_seconds:
            self.log_line(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_started = self.clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_started is not None:
            self._last_validation = self.clock() - self._val_started
            self._val_seconds += self._last_validation
            self._val_started = None
        if not trainer.sanity_checking and self._started is not None:
            self.log_line(trainer, pl_module)

    def validations_left(self, step: int, total: int) -> int:
        """Validations still due after step ``step`` of ``total`` (0 without an interval)."""
        every = self.val_every_n_steps
        if not every:
            return 0
        last = self.validate_last and total % every != 0
        return max(0, total // every - step // every) + (last and step < total)

    def log_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the progress line now (rank 0)."""
        if self._started is None:
            return
        now, since, step = self.clock(), self._last_line, trainer.global_step
        training = now - since - self._val_seconds  # the training steps' time since the last line
        done, per_step = step - self._last_step, training / max(1, step - self._last_step)
        if done <= 0:  # nothing new since the last line (a validation right after one): the rate of the last line
            done, per_step = step - self._steps_before, self._per_step
        self._last_line, self._last_step, self._val_seconds = now, step, 0.0
        self._per_step = per_step
        if not self._enabled:
            return
        total, elapsed = self.total_train_batches, now - self._started
        parts = [f"step {step:,}/{total:,} ({step / total:.0%})" if math.isfinite(total) else f"step {step:,}"]
        metrics = self.get_metrics(trainer, pl_module)
        parts += [f"{k} {float(metrics[k]):.3f}" for k in ("train/loss", "val/loss", "val/accuracy")
                  if _is_number(metrics.get(k))]
        if done > 0:
            left = (total - step) * per_step + self.validations_left(step, total) * self._last_validation \
                if math.isfinite(total) else None
            parts.append(f"{per_step * 1e3:.1f} ms/step")
            parts.append(f"{timedelta(seconds=int(elapsed))} elapsed" +
                         ("" if left is None else f", {timedelta(seconds=int(left))} left"))
        print(" | ".join(parts), flush=True)


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


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
