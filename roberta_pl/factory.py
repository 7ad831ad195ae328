"""Turn a composed config into the objects a run needs: checks first, then data, trainer, loggers.

Every check that can fail runs before any expensive work (tokenizer training, sharding, model build),
and fails with one line that names the config field and value.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from roberta_pl.callbacks import AtomicCheckpointIO, BatchRamp, LossCurve, StopAtStep, ThroughputLogger
from roberta_pl.optim import BatchPlan, plan_batch, plan_ramp


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and value."""


# -- checks ------------------------------------------------------------------------------------------
def world_size(cfg: DictConfig) -> int:
    """Ranks the run will have: devices per node x nodes (``devices=auto`` counts visible GPUs)."""
    t = cfg.trainer
    devices = t.devices
    if devices in ("auto", -1, "-1"):
        n = torch.cuda.device_count() if t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    elif isinstance(devices, (int, str)):
        n = int(devices)
    else:  # a list of device indices
        n = len(devices)
    return max(1, n) * t.num_nodes


def preflight(cfg: DictConfig, out_dir: Path) -> BatchPlan:
    """Refuse a config that cannot run, before any work. Returns the batch plan."""
    t, b = cfg.trainer, cfg.batch
    if t.strategy == "deepspeed" and (t.accelerator == "cpu" or not torch.cuda.is_available()):
        raise ConfigError(f"trainer.strategy=deepspeed needs CUDA GPUs (accelerator={t.accelerator}, "
                          f"cuda available={torch.cuda.is_available()}); use trainer=cpu or trainer=ddp on CPU")
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={t.accelerator} but no CUDA GPU is visible; use trainer=cpu")
    if cfg.data.packing not in ("full_sentences", "doc"):
        raise ConfigError(f"data.packing={cfg.data.packing}: choose full_sentences or doc")
    if b.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"batch.seq_len={b.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} "
                          f"(the position table has {cfg.model.max_seq_len + 2} rows)")
    plan = plan_batch(b.global_batch_size, b.micro_batch_size, world_size(cfg), b.seq_len)
    plan_ramp([tuple(r) for r in b.ramp], plan)
    if b.ramp and t.strategy == "deepspeed":
        raise ConfigError("batch.ramp is not supported with trainer.strategy=deepspeed (DeepSpeed fixes accumulation "
                          "at start-up); drop the ramp or use ddp")
    if cfg.data.train_shards is not None:
        if cfg.data.tokenizer is None:
            raise ConfigError("data.tokenizer is required with data.train_shards (the tokenizer the shards were made with)")
        if not Path(cfg.data.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: no such directory")
        for field in ("train_shards", "valid_shards"):
            spec = cfg.data.get(field)
            if spec and not str(spec).startswith("pipe:") and "{" not in str(spec) and not Path(spec).exists():
                raise ConfigError(f"data.{field}={spec}: no such file or directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir={out_dir} is not writable: {e.strerror or e}") from None
    if cfg.resume == "never" and find_resume_checkpoint(out_dir):
        raise ConfigError(f"run_dir={out_dir} already holds checkpoints and resume=never would overwrite them; "
                          f"use resume=auto or another run_name")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint")
    return plan


def check_vocab(model_vocab: int | None, tokenizer_vocab: int) -> int:
    """The model's vocabulary: the tokenizer's unless set, and never smaller than it."""
    if model_vocab is None:
        return tokenizer_vocab
    if tokenizer_vocab > model_vocab:
        raise ConfigError(f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size={model_vocab}; "
                          f"ids >= {model_vocab} would index past the embedding table")
    return model_vocab


# -- data --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock across processes (all Slurm ranks start at once; one builds, the others wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- trainer -----------------------------------------------------------------------------------------
def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and Slurm's ``hpc_ckpt_*.ckpt`` in the run directory."""
    candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def deepspeed_config(cfg: DictConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``trainer.deepspeed``; Lightning adds accumulation, clipping, precision."""
    ds = cfg.trainer.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_parameters:
        if ds.stage != 3:
            raise ConfigError(f"trainer.deepspeed.offload_parameters needs stage 3 (stage={ds.stage})")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    # Iterable loaders have no length for DeepSpeed to infer the micro batch from: give it explicitly.
    return {"train_micro_batch_size_per_gpu": plan.micro_batch_size, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True}


def build_strategy(cfg: DictConfig, plan: BatchPlan):
    if cfg.trainer.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=deepspeed_config(cfg, plan))
    if cfg.trainer.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Lightning's default checkpoint I/O is replaced by the atomic one.
        return DDPStrategy(checkpoint_io=AtomicCheckpointIO(), process_group_backend=None)
    return cfg.trainer.strategy


def wandb_run_id(out_dir: Path) -> str:
    """The W&B run id stored in the run directory, created once: resumes and requeues continue the run."""
    path = out_dir / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
        path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, out_dir: Path, resolved_config: dict) -> list:
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(save_dir=out_dir, name="csv")]  # version_N per launch: a resume never deletes logs
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return [TensorBoardLogger(save_dir=out_dir, name="tensorboard")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = {"dryrun": "offline"}.get(cfg.logger.mode, cfg.logger.mode)  # W&B's legacy name for offline
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.mode={cfg.logger.mode}: choose offline, online or disabled")
        logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.run_name,
                             save_dir=str(out_dir), id=wandb_run_id(out_dir), offline=mode != "online",
                             resume="allow", tags=list(cfg.logger.tags), mode=mode)
        logger.log_hyperparams(resolved_config)
        return [logger]
    raise ConfigError(f"logger.kind={kind}: choose wandb, csv, tensorboard or none")


def build_trainer(cfg: DictConfig, out_dir: Path, plan: BatchPlan, resolved_config: dict) -> pl.Trainer:
    t = cfg.trainer
    checkpoints = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="step-{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True, save_top_k=cfg.checkpoint.keep,
        monitor="step", mode="max",
    )
    callbacks = [checkpoints, LossCurve(out_dir), ThroughputLogger()]
    if t.stop_at_step is not None:
        callbacks.append(StopAtStep(t.stop_at_step))
    accumulation = plan.accumulation
    if cfg.batch.ramp:
        phases = plan_ramp([tuple(r) for r in cfg.batch.ramp], plan)
        callbacks.append(BatchRamp(phases))
        accumulation = phases[0][2]
    loggers = build_loggers(cfg, out_dir, resolved_config)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    strategy = build_strategy(cfg, plan)
    plugins = [AtomicCheckpointIO()] if isinstance(strategy, str) else []
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, accumulate_grad_batches=accumulation,
        # Validation every N optimizer steps; Lightning counts micro-batches here.
        val_check_interval=t.val_every_n_steps * plan.accumulation, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val or None, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, callbacks=callbacks, logger=loggers or False,
        default_root_dir=out_dir, plugins=plugins, num_sanity_val_steps=0,
    )
    return trainer
