"""Turn a composed config into the objects a run needs: checks first, then data, trainer, loggers.

Every check that can fail runs before any expensive work (tokenizer training, sharding, model build),
and fails with one line that names the config field and value.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from roberta_pl.callbacks import (
    AtomicCheckpointIO,
    BatchRamp,
    DataSkipMonitor,
    LossCurve,
    LossScaleMonitor,
    NonFiniteLossGuard,
    RequeueOnSignal,
    StepCheckpoint,
    StepProgressBar,
    StopAtStep,
    ThroughputLogger,
    ValidationSchedule,
)
from roberta_pl.errors import ConfigError
from roberta_pl.lightning_compat import slurm_environment
from roberta_pl.loggers import StepLearningRateMonitor, build_loggers, check_logger
from roberta_pl.optim import BatchPlan, plan_batch, plan_ramp


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
    check_logger(cfg)
    check_model_and_optim(cfg)
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={t.accelerator} but no CUDA GPU is visible; use trainer=cpu, or add "
                          f"trainer.accelerator=cpu (DDP and DeepSpeed ZeRO also run on CPU ranks)")
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
    if t.strategy == "deepspeed" and t.accelerator == "cpu" and str(t.precision) in ("16-mixed", "16", "16-true"):
        # DeepSpeed's CPU accelerator has fp16 only where oneDNN does; where it does, this project's CPU fp16
        # path (a GradScaler plugin, precision_setting) would still replace DeepSpeed's own loss scaling.
        raise ConfigError(f"trainer.precision={t.precision} is not supported with trainer.strategy=deepspeed on "
                          f"trainer.accelerator=cpu; use trainer.precision=bf16-mixed or 32-true (or fp16 on GPUs)")
    if t.strategy == "deepspeed" and t.deepspeed.offload_optimizer:
        from roberta_pl.strategies import load_cpu_adam

        why = load_cpu_adam(t.accelerator)
        if why:
            raise ConfigError(f"trainer.deepspeed.offload_optimizer=true needs DeepSpeed's CPU Adam op, which could not "
                              f"be built here ({why}); use trainer=deepspeed_zero3 (no offload)")
    if cfg.data.train_shards is not None:
        if cfg.data.tokenizer is None:
            raise ConfigError("data.tokenizer is required with data.train_shards (the tokenizer the shards were made with)")
        if not Path(cfg.data.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: no such directory")
        for field in ("train_shards", "valid_shards"):
            spec = cfg.data.get(field)
            if spec and not str(spec).startswith("pipe:") and "{" not in str(spec) and not Path(spec).exists():
                raise ConfigError(f"data.{field}={spec}: no such file or directory")
    check_writable(out_dir)
    if cfg.resume == "never" and find_resume_checkpoint(out_dir):
        raise ConfigError(f"run_dir={out_dir} already holds checkpoints and resume=never would overwrite them; "
                          f"use resume=auto or another run_name")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint")
    return plan


def check_model_and_optim(cfg: DictConfig) -> None:
    """One line naming the field, the value and what would work, for a model shape or optimizer setting that
    would otherwise fail deep inside model building or train silently wrong (a negative learning rate)."""
    m, o = cfg.model, cfg.optim
    for field in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len"):
        if int(m[field]) <= 0:
            raise ConfigError(f"model.{field}={m[field]}: must be a positive integer")
    if m.hidden_size % m.num_heads:
        lo, hi = m.hidden_size // m.num_heads * m.num_heads, (m.hidden_size // m.num_heads + 1) * m.num_heads
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
                          f"use a multiple of {m.num_heads} (e.g. {lo or hi} or {hi}) or another num_heads")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr={o.lr}: the peak learning rate must be positive (RoBERTa-base used 6e-4)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)}: two values in [0, 1), e.g. [0.9, 0.98]")
    if not o.eps > 0 or o.weight_decay < 0 or o.warmup_steps < 0:
        bad = next(f"optim.{k}={o[k]}" for k in ("eps", "weight_decay", "warmup_steps")
                   if (o[k] <= 0 if k == "eps" else o[k] < 0))
        raise ConfigError(f"{bad}: eps must be positive, weight_decay and warmup_steps not negative")


# Fields that fix parameter shapes or token meaning: a checkpoint must agree on all of them to resume.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len",
                 "pad_vocab_multiple", "pad_token_id", "bos_token_id", "eos_token_id")


def read_checkpoint(ckpt: Path) -> dict:
    """A Lightning checkpoint read with ``weights_only=True`` (no pickled code runs) and memory-mapped (tensors
    are not read until used). DeepSpeed checkpoint directories keep the Lightning part in
    ``checkpoint/*mp_rank_00_model_states.pt`` (ZeRO-3 prefixes it with ``zero_pp_rank_0_``); ``{}`` when absent."""
    path = ckpt
    if ckpt.is_dir():
        path = next(iter(sorted(ckpt.glob("checkpoint/*mp_rank_00_model_states.pt"))), None)
        if path is None:
            return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError/EOFError for a damaged file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "Unsupported global" in line), lines[0].split(". ")[0])
        raise ConfigError(f"resume checkpoint {ckpt} cannot be loaded safely (weights_only=True): {why[:200]}") from None


def read_checkpoint_hparams(ckpt: Path) -> dict:
    """The hyper-parameters saved in a checkpoint (see :func:`read_checkpoint`)."""
    return dict(read_checkpoint(ckpt).get("hyper_parameters") or {})


def describe_resume(ckpt: Path, state: dict, wandb_id: str | None = None) -> str:
    """One line saying what a resume continues from: the checkpoint, its step (``state`` is what
    :func:`read_checkpoint` returned for it), the data position, the W&B run."""
    data = state.get("MLMDataModule") or {}
    parts = [f"step {state.get('global_step', '?')}"]
    if "consumed" in data:
        parts.append(f"data position {data['consumed']} micro-batches per rank ({data.get('world_size', '?')} ranks "
                     f"of {data.get('micro_batch_size', '?')} sequences)")
    if wandb_id:
        parts.append(f"W&B run {wandb_id}")
    return f"Resuming from {ckpt}: {', '.join(parts)}"


def check_resume_checkpoint(ckpt: Path, model: dict, tokenizer_hash: str) -> None:
    """Refuse, before training, a resume checkpoint from another model size or tokenizer.

    Args:
        ckpt: the checkpoint the run would resume from.
        model: this run's model fields (``vocab_size`` resolved).
        tokenizer_hash: the content hash of this run's tokenizer.

    Raises:
        ConfigError: one line naming the checkpoint, the field and both values.
    """
    hp = read_checkpoint_hparams(ckpt)
    saved = hp.get("model") or {}
    diffs = [f"model.{k}={saved[k]} in the checkpoint but {model[k]} here" for k in _SHAPE_FIELDS
             if k in saved and k in model and saved[k] != model[k]]
    saved_hash = hp.get("tokenizer_hash")
    if saved_hash is not None and saved_hash != tokenizer_hash:
        diffs.append(f"tokenizer {saved_hash} in the checkpoint but {tokenizer_hash} here (data.tokenizer)")
    if diffs:
        raise ConfigError(f"resume checkpoint {ckpt} does not fit this run: {'; '.join(diffs)}; "
                          f"match the config, or start a new run (another run_name, or resume=never in a new run_dir)")


def checkpoint_bytes(model: dict) -> int:
    """Bytes one checkpoint of this model takes: fp32 weights plus AdamW's two moments, plus 10% slack."""
    from roberta_pl.model import RobertaConfig, RobertaForMaskedLM

    with torch.device("meta"):  # shapes only: nothing is allocated
        n = sum(p.numel() for p in RobertaForMaskedLM(RobertaConfig(**model)).parameters())
    return int(n * 4 * 3 * 1.1)


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and prove a file can be written there; one line naming it otherwise."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir={out_dir} is not writable: {e.strerror or e}") from None


def check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse a run directory that cannot hold one more checkpoint, before training starts.

    Two checks: the file system's free space (``statvfs``), and reserving ``needed`` bytes in a probe file
    (``posix_fallocate``), which also meets quotas and file-size limits (``ulimit -f``) that free space
    does not show. The probe is deleted at once.

    Raises:
        ConfigError: one line naming the run directory, the free space and the size needed.
    """
    import shutil

    free = shutil.disk_usage(out_dir).free
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    if free < needed:
        raise ConfigError(f"run_dir={out_dir} has {mb(free)} free, but one checkpoint needs about {mb(needed)}; "
                          f"free space or choose another run_dir")
    probe = out_dir / f".space-test-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fh.fileno(), 0, needed)
            else:  # macOS: seek and write the last byte
                fh.seek(needed - 1)
                fh.write(b"\0")
    except OSError as e:
        raise ConfigError(f"run_dir={out_dir} cannot hold a checkpoint of about {mb(needed)}: "
                          f"{e.strerror or e} (disk full, quota or file-size limit)") from None
    finally:
        probe.unlink(missing_ok=True)


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
        from roberta_pl.strategies import ZeroStrategy

        return ZeroStrategy(config=deepspeed_config(cfg, plan))
    if cfg.trainer.strategy == "ddp":
        from roberta_pl.strategies import RendezvousDDPStrategy

        # Lightning's default checkpoint I/O is replaced by the atomic one.
        return RendezvousDDPStrategy(checkpoint_io=AtomicCheckpointIO(), process_group_backend=None)
    return cfg.trainer.strategy


def extra_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The user's ``trainer.callbacks`` (``{_target_: module.Class, ...}`` each), instantiated. Call
    :func:`roberta_pl.safety.check_hydra_targets` on the config first."""
    from hydra.utils import instantiate

    built = []
    for i, spec in enumerate(cfg.trainer.callbacks):
        try:
            callback = instantiate(spec)
        except Exception as e:  # an import or argument error in the user's spec
            cause = e.__cause__ or e
            raise ConfigError(f"trainer.callbacks.{i}={spec.get('_target_')}: cannot instantiate: "
                              f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
        if not isinstance(callback, pl.Callback):
            raise ConfigError(f"trainer.callbacks.{i}={spec.get('_target_')}: not a Lightning Callback")
        built.append(callback)
    return built


def precision_setting(t: DictConfig) -> tuple[str | None, list]:
    """``(precision, plugins)`` for the Trainer. Lightning silently turns ``16-mixed`` into bf16 on CPU;
    fp16 is honoured there with a real GradScaler instead (so loss-scale faults behave as on GPU)."""
    if t.precision == "16-mixed" and t.accelerator == "cpu":
        from lightning.pytorch.plugins import MixedPrecision

        return None, [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]
    return t.precision, []


def build_trainer(cfg: DictConfig, out_dir: Path, plan: BatchPlan, resolved_config: dict) -> pl.Trainer:
    t = cfg.trainer
    checkpoints = StepCheckpoint(
        dirpath=out_dir / "checkpoints", filename="step-{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True, save_top_k=cfg.checkpoint.keep,
        monitor="step", mode="max",
    )
    callbacks = [checkpoints, RequeueOnSignal(out_dir / "checkpoints" / "last.ckpt"), LossCurve(out_dir),
                 ThroughputLogger(), NonFiniteLossGuard(t.nonfinite_loss),
                 LossScaleMonitor(t.min_loss_scale), DataSkipMonitor(), *extra_callbacks(cfg)]
    if t.enable_progress_bar:
        callbacks.append(StepProgressBar())
    if t.stop_at_step is not None:
        callbacks.append(StopAtStep(t.stop_at_step))
    phases = plan_ramp([tuple(r) for r in cfg.batch.ramp], plan)
    if cfg.batch.ramp:
        callbacks.append(BatchRamp(phases))
    callbacks.append(ValidationSchedule(t.val_every_n_steps, phases))
    accumulation = phases[0][2]
    loggers = build_loggers(cfg, out_dir, resolved_config)
    if loggers:
        callbacks.append(StepLearningRateMonitor(logging_interval="step"))
    strategy = build_strategy(cfg, plan)
    plugins = [AtomicCheckpointIO()] if isinstance(strategy, str) else []
    precision, precision_plugins = precision_setting(t)
    plugins += precision_plugins
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=precision, max_steps=t.max_steps, accumulate_grad_batches=accumulation,
        # Validation every N optimizer steps; Lightning counts micro-batches here, and ValidationSchedule
        # keeps it on step boundaries when a ramp changes the accumulation.
        val_check_interval=t.val_every_n_steps * plan.accumulation, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val or None, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, callbacks=callbacks, logger=loggers or False,
        default_root_dir=out_dir, plugins=plugins, num_sanity_val_steps=0,
        enable_model_summary=False,  # the run prints its own one-line model summary (Lightning's shows FLOPs 0)
    )
    slurm = slurm_environment(trainer)
    if slurm is not None:  # RequeueOnSignal requeues at a step boundary; Lightning's own would save mid-step
        slurm.auto_requeue = False
    return trainer
