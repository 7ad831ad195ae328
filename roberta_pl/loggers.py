"""Loggers for both entry points: CSV, TensorBoard and W&B, all numbering records by optimizer step.

Lightning hands loggers the number of optimizer steps completed *before* the current one, so the metrics
of step 100 (and the validation after it) were recorded as step 99, while ``metrics_history.json``,
checkpoints (``step-0000100.ckpt``) and the progress bar say 100. The loggers here add the one, so the same
event carries the same step number everywhere: the optimizer step it follows.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from omegaconf import DictConfig

from roberta_pl.errors import ConfigError
from roberta_pl.lightning_compat import drop_wandb_init_setting


class _OptimizerStep:
    """Records metrics under the optimizer step they belong to (Lightning's ``step`` plus one)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + 1)  # type: ignore[misc]


class CSVLogger(_OptimizerStep, _CSVLogger):
    pass


class TensorBoardLogger(_OptimizerStep, _TensorBoardLogger):
    pass


class WandbLogger(_OptimizerStep, _WandbLogger):
    """Lightning's W&B logger, without wandb's end-of-run "Run history:" / "Run summary:" block (sparklines and
    final values of every metric): the run has just printed its own summary, and ``summary.json`` holds it.
    wandb's offline files, its ``wandb sync`` line and its log location stay as they were."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("settings", _no_end_of_run_tables())
        super().__init__(**kwargs)
        drop_wandb_init_setting(self, "anonymous")  # wandb only warns that it has no effect


def _no_end_of_run_tables():
    """``wandb.Settings`` showing no history or summary rows when a run finishes; None on a wandb without those
    settings (it prints its block)."""
    import wandb

    try:
        return wandb.Settings(max_end_of_run_history_metrics=0, max_end_of_run_summary_metrics=0)
    except (TypeError, ValueError):  # an older wandb: unknown settings (pydantic's ValidationError is a ValueError)
        return None


def log_at_step(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to every logger of ``trainer`` under optimizer step ``step`` (the step they follow), from
    outside Lightning's logging steps (``self.log`` reaches the loggers only every ``log_every_n_steps``). The
    loggers here number by optimizer step themselves (:class:`_OptimizerStep`: Lightning's step plus one)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step - 1 if isinstance(logger, _OptimizerStep) else step)
        logger.save()


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, once per optimizer step: it logs at the start of every micro-batch of a
    logging step, so under gradient accumulation each learning rate was recorded once per micro-batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._logged_at = -1

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step != self._logged_at:
            self._logged_at = trainer.global_step
            super().on_train_batch_start(trainer, *args, **kwargs)


def wandb_run_id(out_dir: Path) -> str:
    """The W&B run id stored in the run directory, created once: resumes and requeues continue the run."""
    path = out_dir / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
        path.write_text(run_id + "\n")
    return run_id


def check_logger(cfg: DictConfig) -> None:
    """Refuse, before any work, a logger that cannot be built: a missing package (``logger.kind`` and ``logger.mode``
    are typed choices, checked when the config is composed)."""
    import importlib.util

    if cfg.logger.kind == "tensorboard" and not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        raise ConfigError("logger=tensorboard needs the tensorboard package (a roberta-pl dependency): "
                          "pip install tensorboard")


def _wait_for_a_new_segment_name(wandb_dir: Path, run_id: str) -> None:
    """W&B names a run's folder ``{offline-,}run-<YYYYmmdd_HHMMSS>-<id>``: a resume of the same run within the
    second its last start began (a quick rerun, a test) would write into that folder and replace its records.
    Wait (at most a second) until the name is new."""
    import time

    for _ in range(20):
        stamp = time.strftime("%Y%m%d_%H%M%S")
        if not any(wandb_dir.glob(f"*run-{stamp}-{run_id}")):
            return
        time.sleep(0.1)


def build_loggers(cfg: DictConfig, out_dir: Path, resolved_config: dict) -> list:
    """The ``logger`` group's loggers (none, CSV, TensorBoard or W&B), numbering every record by optimizer step."""
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        return [CSVLogger(save_dir=out_dir, name="csv")]  # version_N per launch: a resume never deletes logs
    if kind == "tensorboard":
        return [TensorBoardLogger(save_dir=out_dir, name="tensorboard", default_hp_metric=False)]  # no placeholder hp_metric
    if kind == "wandb":
        mode = {"dryrun": "offline"}.get(str(cfg.logger.mode), str(cfg.logger.mode))  # W&B's legacy name for offline
        run_id = wandb_run_id(out_dir)
        _wait_for_a_new_segment_name(out_dir / "wandb", run_id)
        logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.run_name,
                             save_dir=str(out_dir), id=run_id, offline=mode != "online",
                             resume="allow", tags=list(cfg.logger.tags), mode=mode)
        logger.log_hyperparams(resolved_config)
        return [logger]
    raise ValueError(f"logger.kind={kind}: no logger of that kind")  # the schema's choices are all handled above


class _DropNotice(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_notices() -> None:
    """Silence library notices that do not apply to roberta-pl runs, for both entry points (ranks a launcher starts
    run the same ``main``, and DataLoader workers are forked with these filters). Each filter names the message and
    the library module that raises it, so the same words from roberta-pl, or anything else, still show:

    - Lightning's ``srun`` hint (a plain run on a machine that has Slurm installed is not a Slurm run);
    - the LitLogger advertisement;
    - ``IterableDataset has __len__`` (our stream's length is already split per worker);
    - deprecated torch APIs that libraries call, not roberta-pl: Lightning's pytree ``LeafSpec`` check, and
      DeepSpeed's ``all_gather_into_tensor`` (every ZeRO step, on every rank), torch's own ``script_method``;
    - the device inventory, "Seed set to", the ``limit_val_batches=1.0`` notices and the logging-interval
      warning of a short epoch;
    - "Checkpoint directory ... exists and is not empty": a resume writes on into its own run directory (a new run
      into one that holds checkpoints is refused before any work: ``resume=never``);
    - "You have overridden ``transfer_batch_to_device`` in ``LightningModule``": it is meant to be the module's;
    - the compiler lines of DeepSpeed's probe for libaio (its async-I/O op, which roberta-pl does not use).
    """
    import warnings

    def drop(message: str, module: str, category: type[Warning] = UserWarning) -> None:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)

    drop(r"The `srun` command is available on your system but is not used", r"lightning\.fabric\.plugins\.environments\.slurm")
    drop(r"Your `IterableDataset` has `__len__` defined", r"lightning\.pytorch\.utilities\.data")
    drop(r"The number of training batches \(\d+\) is smaller than the logging interval",  # a short fine-tuning epoch
         r"lightning\.pytorch\.loops\.fit_loop")
    drop(r"Checkpoint directory .* exists and is not empty", r"lightning\.pytorch\.callbacks\.model_checkpoint")
    # MaskedLMModule.transfer_batch_to_device drops an all-ones attention mask; the DataModule has no such hook,
    # so Lightning uses the module's, which is what it warns about.
    drop(r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
         r"lightning\.pytorch\.trainer\.connectors\.data_connector")
    # Deprecated torch APIs called by libraries (checked with torch 2.13.0, lightning 2.6.6, deepspeed 0.19.8); they
    # go when the libraries move. torch's c10d wrapper is where the all-gather warning points: roberta-pl never calls
    # all_gather_into_tensor, DeepSpeed's ZeRO gathers its partitions with it at every step.
    drop(r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree", FutureWarning)
    drop(r"`torch\.distributed\.all_gather_into_tensor` is deprecated", r"torch\.distributed\.c10d_logger", FutureWarning)
    # DeepSpeed's optimizer check imports its Muon optimizer, whose torch.compile loads torch's MKL-DNN modules, which
    # use torch.jit.script_method: 14 warnings per rank where DeprecationWarnings show (python -W default, say).
    # roberta-pl has no TorchScript.
    drop(r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script", DeprecationWarning)
    # Lightning's start-up lines: the device inventory (the run's own lines say what it uses), and the notices
    # that limit_val_batches=1.0 / val_check_interval=1.0 mean "all" and "each epoch", which is what they say.
    notices = _DropNotice("litlogger", "GPU available: ", "TPU available: ", "HPU available: ", "was configured so")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(notices)
    logging.getLogger("lightning.fabric.utilities.seed").addFilter(_DropNotice("Seed set to"))  # the config records it
    # DeepSpeed's CPU accelerator checks for libaio by compiling a test program through setuptools' compiler, which
    # logs each gcc command at INFO (Hydra sets the root logger to INFO); a failed compile is DeepSpeed's to report.
    logging.getLogger("compilers.C.base").setLevel(logging.WARNING)
