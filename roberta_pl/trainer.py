"""Building the ``pl.Trainer`` both entry points use: callbacks, loggers, strategy, precision.

:func:`build_trainer` holds what pretraining and fine-tuning share (the fault guards, the user's
``trainer.callbacks``, loggers and the LR monitor, precision, atomic checkpoint writes, the common Trainer
arguments); :func:`pretraining_trainer` and :func:`finetuning_trainer` add what differs (checkpointing,
schedules, stopping).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from roberta_pl.batch_plan import BatchPlan
from roberta_pl.callbacks import (
    LossScaleMonitor,
    NonFiniteLossGuard,
)
from roberta_pl.checkpoints import AtomicCheckpointIO
from roberta_pl.errors import ConfigError
from roberta_pl.lightning_compat import slurm_environment
from roberta_pl.loggers import StepLearningRateMonitor, build_loggers


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

        # DeepSpeed's fp16 loss scaler (GPUs) raises its own multi-line exception at its floor: put that floor one
        # halving below trainer.min_loss_scale, so LossScaleMonitor stops the run first, with one line naming the step.
        return ZeroStrategy(config=deepspeed_config(cfg, plan), min_loss_scale=cfg.trainer.min_loss_scale / 2)
    if cfg.trainer.strategy == "ddp":
        from roberta_pl.strategies import RendezvousDDPStrategy

        # Lightning's default checkpoint I/O is replaced by the atomic one.
        return RendezvousDDPStrategy(checkpoint_io=AtomicCheckpointIO(), process_group_backend=None)
    return str(cfg.trainer.strategy)  # a plain string for Lightning


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


def build_trainer(cfg: DictConfig, out_dir: Path, resolved_config: dict, callbacks: list[pl.Callback],
                  later_callbacks: list[pl.Callback] = (), strategy: Any = None, **arguments: Any) -> pl.Trainer:
    """The ``pl.Trainer`` of a run.

    Args:
        cfg: the composed config (``trainer``, ``logger`` and ``trainer.callbacks`` are read).
        out_dir: the run directory (loggers, Lightning's default root).
        resolved_config: the config as a plain dict, for the loggers.
        callbacks, later_callbacks: the entry point's own callbacks, run before and after the shared guards
            and the user's ``trainer.callbacks``; the LR monitor (with a logger) comes last.
        strategy: a strategy object or name (default ``cfg.trainer.strategy``).
        arguments: the ``pl.Trainer`` arguments that differ between entry points (steps or epochs,
            accumulation, the validation schedule).
    """
    t = cfg.trainer
    # The guards every run has: a NaN/inf loss stops (or skips, trainer.nonfinite_loss) naming the step, and an
    # fp16 loss-scale collapse is reported; then the user's own trainer.callbacks.
    callbacks = [*callbacks, NonFiniteLossGuard(t.nonfinite_loss), LossScaleMonitor(t.min_loss_scale),
                 *extra_callbacks(cfg), *later_callbacks]
    loggers = build_loggers(cfg, out_dir, resolved_config)
    if loggers:
        callbacks.append(StepLearningRateMonitor(logging_interval="step"))
    strategy = str(t.strategy) if strategy is None else strategy
    # Checkpoints are written to a temp file and renamed; a strategy object carries its own CheckpointIO.
    plugins = [AtomicCheckpointIO()] if isinstance(strategy, str) else []
    precision, precision_plugins = precision_setting(t)
    trainer = pl.Trainer(
        accelerator=str(t.accelerator), devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=precision, limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val or None, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, callbacks=callbacks, logger=loggers or False,
        default_root_dir=out_dir, plugins=[*plugins, *precision_plugins], num_sanity_val_steps=0,
        enable_model_summary=False,  # each run prints its own one-line model summary (Lightning's shows FLOPs 0)
        **arguments,
    )
    share_cpu_threads(trainer)
    slurm = slurm_environment(trainer)
    if slurm is not None:  # RequeueOnSignal requeues at a step boundary; Lightning's own would save mid-step
        slurm.auto_requeue = False
    return trainer


def share_cpu_threads(trainer: pl.Trainer) -> int | None:
    """On CPU, give each of this node's ranks its share of the cores for torch's intra-op threads.

    torch gives every process all the cores it may use, so N ranks on one node run N times as many threads as
    there are cores: their parallel regions then wait on descheduled threads, and a small model's step takes
    several times longer (6x for the tests' 2-layer model, 2 ranks on 2 cores). torchrun sets
    ``OMP_NUM_THREADS=1`` for the same reason; an ``OMP_NUM_THREADS`` the user set is kept.

    Returns:
        The threads set, or None when nothing was changed (not CPU, one rank, or ``OMP_NUM_THREADS`` set).
    """
    from lightning.pytorch.accelerators import CPUAccelerator

    if not isinstance(trainer.accelerator, CPUAccelerator) or trainer.num_devices < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = rank_cpus(trainer.num_devices)
    torch.set_num_threads(threads)
    return threads


def rank_cpus(ranks_here: int) -> int:
    """The CPUs one rank may use, of the ``ranks_here`` ranks on its node.

    Under Slurm, ``SLURM_CPUS_PER_TASK`` is each rank's own share: with per-task binding its affinity mask is already
    just its cores (dividing them again by the ranks per node gave each rank 1/N of its own), without binding the mask
    is the node's allocation. Elsewhere the ranks of a node share this process's affinity mask (``available_cpus``).
    """
    from data_pipelines.shards import available_cpus

    per_task = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
    if per_task > 0:
        return max(1, min(per_task, available_cpus()))
    return max(1, available_cpus() // max(1, ranks_here))


_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_GLIBC_KEEP_BYTES = 512 << 20


def keep_freed_memory(trainer: pl.Trainer) -> bool:
    """On CPU with glibc, let freed blocks of up to 512 MiB be reused instead of handed back to the kernel.

    glibc serves a block over its mmap threshold (128 KiB to 32 MiB, adapting) with a fresh mapping and returns it
    on free, and trims the heap top past 128 KiB, so a step's large tensors (the masked positions' logits, the
    activations) come back every step as new zeroed pages: a page fault each 4 KiB. On the quickstart's model that
    was 6,000 faults and 13 ms of kernel time a 72 ms step; with both thresholds raised, 200 faults and 1 ms (what
    jemalloc or tcmalloc would also buy). The process keeps up to 512 MiB it freed for its next step.

    Nothing is changed off CPU, off glibc, or when the user set glibc's own ``MALLOC_*_`` variables or
    ``glibc.malloc`` tunables (``GLIBC_TUNABLES``), or preloads an allocator (``LD_PRELOAD``). Returns whether the
    thresholds were set.

    The setting is process-wide and cannot be undone, so only a process that exists to pretrain asks for it:
    ``roberta-pl-train`` (``pretraining_trainer(..., tune_allocator=True)``), not fine-tuning, not a library caller
    of ``roberta_pl.pretraining.app.run`` in a process of its own.
    """
    import ctypes
    import platform

    from lightning.pytorch.accelerators import CPUAccelerator

    user_set = any(k in os.environ for k in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    if (not isinstance(trainer.accelerator, CPUAccelerator) or platform.libc_ver()[0] != "glibc" or user_set
            or os.environ.get("LD_PRELOAD")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # The mmap threshold first: a glibc that caps it (mallopt(3): 32 MiB on 64-bit) gets the cap. The trim threshold
    # only once that worked: setting it alone freezes the mmap threshold at 128 KiB, worse than glibc's default.
    if not (libc.mallopt(m_mmap_threshold, _GLIBC_KEEP_BYTES) or libc.mallopt(m_mmap_threshold, 32 << 20)):
        return False
    return bool(libc.mallopt(m_trim_threshold, _GLIBC_KEEP_BYTES))


class ReturnFreedMemory(pl.Callback):
    """With glibc's thresholds raised (:func:`keep_freed_memory`), hand the heap's free pages back every
    ``every_n_steps`` optimizer steps (``malloc_trim``). The MLM logits change size every step, so the kept heap
    fragments: the quickstart's trainer grew from 892 to 1,556 MiB over steps 300-1,000 (+74%) and never levelled off;
    trimmed every 100 steps, 510 -> 529 MiB (+3.6%; bench/memory_growth.py), while a step still reuses its memory."""

    def __init__(self, every_n_steps: int = 100) -> None:
        import ctypes

        self.every_n_steps = every_n_steps
        self._libc = ctypes.CDLL("libc.so.6")
        self._trimmed_at = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._trimmed_at and step % self.every_n_steps == 0:
            self._trimmed_at = step
            self._libc.malloc_trim(0)


