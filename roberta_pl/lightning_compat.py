"""Every access to Lightning internals, in one place.

Lightning exposes no public API for these; each function names the attribute it reads or writes and the
Lightning version it was checked against. ``tests/unit/test_lightning_compat.py`` exercises each one on a real
Trainer, so a Lightning upgrade that moves one fails there, loudly, not as a silently wrong run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.environments import SLURMEnvironment

CHECKED_AGAINST = "2.6.6"


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether this batch's metrics go to the loggers (every ``log_every_n_steps`` optimizer steps).

    Lightning 2.6.6: ``trainer._logger_connector.should_update_logs``."""
    return bool(trainer._logger_connector.should_update_logs)


def micro_batches_started(trainer: pl.Trainer) -> int:
    """Training micro-batches started so far in the run (restored on resume): the current batch's global
    index is this minus one.

    Lightning 2.6.6: ``trainer.fit_loop.epoch_loop.batch_progress.total.ready``."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)


def completes_step(trainer: pl.Trainer) -> bool:
    """Whether the current training batch is the last of its accumulation window (the optimizer steps after
    it). Valid from ``training_step`` on.

    Lightning 2.6.6: ``not trainer.fit_loop.epoch_loop._should_accumulate()``."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def set_val_check_batch(trainer: pl.Trainer, interval: int) -> None:
    """Validate after training micro-batch ``m`` (0-based, counted over the run) when ``(m + 1) % interval == 0``.

    Lightning 2.6.6: ``trainer.val_check_batch``, read by ``_TrainingEpochLoop._should_check_val_fx`` against
    ``total_batch_idx`` when ``check_val_every_n_epoch=None``."""
    trainer.val_check_batch = interval


def last_saved_step(trainer: pl.Trainer) -> int | None:
    """The optimizer step of the last checkpoint the checkpoint callback wrote in this process (0 before any),
    None without a checkpoint callback.

    Lightning 2.6.6: ``ModelCheckpoint._last_global_step_saved``."""
    callback = trainer.checkpoint_callback
    return None if callback is None else int(callback._last_global_step_saved)


def wandb_run_started(logger: Any) -> bool:
    """Whether a ``WandbLogger`` has created its run (reading ``.experiment`` would create one).

    Lightning 2.6.6: ``WandbLogger._experiment``."""
    return getattr(logger, "_experiment", None) is not None


def set_progress(bar: Any, task_id: Any, completed: float) -> None:
    """Set a ``RichProgressBar`` task to ``completed``.

    Lightning 2.6.6: ``RichProgressBar._update(progress_bar_id, current)``."""
    bar._update(task_id, completed)


def slurm_environment(trainer: pl.Trainer) -> SLURMEnvironment | None:
    """The run's Slurm cluster environment, if Lightning detected one (also for a single-task job, where the
    strategy holds none).

    Lightning 2.6.6: ``trainer._accelerator_connector.cluster_environment``."""
    env = trainer._accelerator_connector.cluster_environment
    return env if isinstance(env, SLURMEnvironment) else None


def drop_wandb_init_setting(logger: Any, key: str) -> None:
    """Remove a setting ``WandbLogger`` would pass to ``wandb.init`` (Lightning always passes ``anonymous``,
    which wandb >= 0.19 answers with a warning that it has no effect).

    Lightning 2.6.6: ``WandbLogger._wandb_init``."""
    logger._wandb_init.pop(key, None)
