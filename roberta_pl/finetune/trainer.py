"""The fine-tuning ``pl.Trainer``: best-checkpoint selection and early stopping."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

from roberta_pl.batch_plan import BatchPlan
from roberta_pl.callbacks import EpochProgressBar
from roberta_pl.trainer import build_trainer


def finetuning_trainer(cfg: DictConfig, out_dir: Path, plan: BatchPlan, resolved_config: dict):
    """The fine-tuning Trainer and its best-checkpoint callback: the best validation metric is kept
    (``checkpoints/best.ckpt``), with early stopping (``early_stopping.patience``), validating every
    ``trainer.val_every_n_steps`` optimizer steps or once per epoch."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from roberta_pl.finetune.module import metric_mode

    # Task sets are small and held in memory: a single-process loader is the right one, not a warning.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    t, monitor = cfg.trainer, f"val/{cfg.task.metric}"
    mode = metric_mode(cfg.task.metric)
    best = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor=monitor, mode=mode,
                           save_top_k=1, save_last=False, auto_insert_metric_name=False, enable_version_counter=False)
    later: list[pl.Callback] = [EpochProgressBar(monitor)] if t.enable_progress_bar else []
    if cfg.early_stopping.patience > 0:
        later.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping.patience,
                                   min_delta=cfg.early_stopping.min_delta))
    trainer = build_trainer(
        cfg, out_dir, resolved_config, [best], later,
        max_epochs=t.max_epochs if t.max_epochs > 0 else None, max_steps=t.max_steps,
        accumulate_grad_batches=plan.accumulation,
        # Validation every N optimizer steps, counted across epochs (Lightning counts micro-batches), or per epoch.
        val_check_interval=t.val_every_n_steps * plan.accumulation if t.val_every_n_steps else 1.0,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1,
    )
    return trainer, best

