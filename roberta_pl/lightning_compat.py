"""Every access to Lightning internals, in one place.

Lightning exposes no public API for these; each function names the attribute it reads or writes and the
Lightning version it was checked against. ``tests/unit/test_lightning_compat.py`` exercises each one on a real
Trainer, so a Lightning upgrade that moves one fails there, loudly, not as a silently wrong run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
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


def set_max_steps(trainer: pl.Trainer, max_steps: int) -> None:
    """Change ``trainer.max_steps`` during fit (a time budget fixes it after measuring the step rate).

    Lightning 2.6.6: ``trainer.fit_loop.epoch_loop.max_steps``, which ``trainer.max_steps`` returns and the
    loop's ``done`` reads at every step."""
    trainer.fit_loop.epoch_loop.max_steps = max_steps


def last_saved_step(trainer: pl.Trainer) -> int | None:
    """The optimizer step of the last checkpoint the checkpoint callback wrote in this process (0 before any),
    None without a checkpoint callback.

    Lightning 2.6.6: ``ModelCheckpoint._last_global_step_saved``."""
    callback = trainer.checkpoint_callback
    return None if callback is None else int(callback._last_global_step_saved)


def release_validation_workers(trainer: pl.Trainer) -> None:
    """Shut down the DataLoader workers of the validation that has just ended (call it from ``on_validation_end``).

    Lightning keeps the validation loader's iterator until the next validation replaces it, and a stream that
    ``limit_val_batches`` cut short has not ended, so its workers (forked copies of the training process) idled
    through every training interval: a copy-on-write page of the trainer became theirs alone each time the trainer
    wrote to it, so each idle worker came to hold as much memory as the trainer. The next validation forks new ones.

    Lightning 2.6.6: ``trainer.fit_loop.epoch_loop.val_loop._data_fetcher``, whose ``teardown()`` resets the
    ``CombinedLoader`` (dropping the iterators, which shuts their workers down); the loop's own ``teardown`` also sets
    it to None, and each validation builds a new one (``_EvaluationLoop.reset``)."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    if loop._data_fetcher is not None:
        loop._data_fetcher.teardown()
        loop._data_fetcher = None


def wandb_run_started(logger: Any) -> bool:
    """Whether a ``WandbLogger`` has created its run (reading ``.experiment`` would create one).

    Lightning 2.6.6: ``WandbLogger._experiment``."""
    return getattr(logger, "_experiment", None) is not None


def set_progress(bar: Any, task_id: Any, completed: float) -> None:
    """Set a ``RichProgressBar`` task to ``completed``.

    Lightning 2.6.6: ``RichProgressBar._update(progress_bar_id, current)``."""
    bar._update(task_id, completed)


def start_train_progress(bar: RichProgressBar) -> None:
    """Create a ``RichProgressBar``'s train task now (a resume mid-epoch skips the epoch start that creates it).

    Lightning 2.6.6: ``RichProgressBar._initialize_train_progress_bar_id()``."""
    bar._initialize_train_progress_bar_id()


def refresh_progress_metrics(bar: RichProgressBar, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Redraw the metrics a ``RichProgressBar`` shows beside its bars from ``bar.get_metrics``.

    Lightning 2.6.6: ``RichProgressBar._update_metrics(trainer, pl_module)``."""
    bar._update_metrics(trainer, pl_module)


class DescribedProgressBar(RichProgressBar):
    """A ``RichProgressBar`` whose train task is labelled by the public :meth:`train_description`, which
    subclasses override (Lightning's label is "Epoch 0/1", counted from zero).

    Lightning 2.6.6: ``RichProgressBar._get_train_description(current_epoch)``, called when the train task is
    created and at each training epoch's start."""

    def train_description(self, current_epoch: int) -> str:
        """The train task's label in epoch ``current_epoch`` (0-based); Lightning's own by default."""
        return super()._get_train_description(current_epoch)

    def _get_train_description(self, current_epoch: int) -> str:
        return self.train_description(current_epoch)


def is_rich_time_column(column: Any) -> bool:
    """Whether ``column`` is the "elapsed • remaining" column of ``RichProgressBar.configure_columns``, which
    times each task from its (re)start: the train task restarts at every epoch.

    Lightning 2.6.6: ``lightning.pytorch.callbacks.progress.rich_progress.CustomTimeColumn``."""
    from lightning.pytorch.callbacks.progress.rich_progress import CustomTimeColumn

    return isinstance(column, CustomTimeColumn)


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


def set_resumed_batch_progress(checkpoint: dict, total: int, in_epoch: int, loader_state: dict | None = None) -> None:
    """Make a loaded checkpoint resume as if ``total`` training micro-batches had run, ``in_epoch`` of them in its
    epoch (call before Lightning restores its loops, e.g. from ``Callback.on_load_checkpoint``). ``loader_state``
    replaces the saved state of a stateful train loader, which Lightning restores after the DataModule's.

    Lightning 2.6.6: ``checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]`` (``total`` and ``current``, each
    ``ready``/``started``/``processed``/``completed``; the accumulation reads ``current.ready``, micro-batch counts and
    the validation schedule ``total.ready``) and ``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``."""
    fit = checkpoint["loops"]["fit_loop"]
    progress = fit["epoch_loop.batch_progress"]
    for part, ready in (("total", total), ("current", in_epoch)):
        shift = ready - progress[part]["ready"]
        progress[part] = {field: max(0, count + shift) for field, count in progress[part].items()}
    if loader_state is not None and fit.get("state_dict", {}).get("combined_loader"):
        fit["state_dict"]["combined_loader"] = [loader_state]
