"""The progress bars: optimizer steps (pretraining) or epochs (fine-tuning), with the run's own time column."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from rich.progress import ProgressColumn, Task
from rich.text import Text

from roberta_pl.lightning_compat import (
    DescribedProgressBar,
    is_rich_time_column,
    refresh_progress_metrics,
    set_progress,
    start_train_progress,
)

_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}



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
