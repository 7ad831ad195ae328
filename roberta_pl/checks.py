"""Checks a run passes before any expensive work: the config (preflight), the resume checkpoint, the disk.

Every check fails with one line that names the config field or file and the value, and what would work
(:class:`~roberta_pl.errors.ConfigError`; the run harness prints it without a traceback). Pretraining and
fine-tuning both check here; their preflights return the one :class:`~roberta_pl.optim.BatchPlan` the rest of
the run uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from roberta_pl.errors import ConfigError


def uses_cuda(cfg: DictConfig) -> bool:
    """The run trains on CUDA GPUs (``trainer.accelerator`` gpu or cuda, or auto with one visible)."""
    accelerator = str(cfg.trainer.accelerator)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


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


def check_precision(cfg: DictConfig) -> None:
    """``trainer.precision`` is one of Lightning's names (the choices that are not Python names, so not an enum)."""
    from roberta_pl.config import PRECISIONS

    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision}: choose one of {', '.join(PRECISIONS)}")


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
    if o.decay == "wsd" and not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction}: the share of the steps after the warm-up that "
                          f"decays, in (0, 1] (e.g. 0.2)")
    if o.decay == "wsd" and o.decay_steps is not None and o.decay_steps < 1:
        raise ConfigError(f"optim.decay_steps={o.decay_steps}: a positive number of last steps to decay over")


def read_checkpoint(ckpt: Path) -> dict:
    """A Lightning training checkpoint read with ``weights_only=True`` (no pickled code runs) and memory-mapped
    (tensors are not read until used). A DeepSpeed checkpoint directory keeps the Lightning part in its current
    save's ``*mp_rank_00_model_states.pt`` (ZeRO-3 prefixes it with ``zero_pp_rank_0_``); every file of that save is
    read the same way first, since DeepSpeed's own load and conversion unpickle them with ``weights_only=False``.

    Raises:
        ConfigError: one line naming the file or directory: pickled code or damage, a directory that is not a
            DeepSpeed checkpoint, or a file that is not a training checkpoint.
    """
    from roberta_pl.checkpoints import (
        UnsafeCheckpointError,
        load_zero_file,
        vet_zero_checkpoint,
        zero_tag_dir,
    )

    try:
        if ckpt.is_dir():
            if zero_tag_dir(ckpt) is None:
                raise ConfigError(f"resume={ckpt}: a directory, but not a DeepSpeed checkpoint directory (no `latest` "
                                  f"file naming a completed save in it); pass a checkpoint file or directory of a run "
                                  f"(checkpoints/last.ckpt or step-*.ckpt), or resume=auto")
            tag = vet_zero_checkpoint(ckpt)
            states = sorted(tag.glob("*mp_rank_00_model_states.pt"))
            if not states:
                raise ConfigError(f"resume={ckpt}: a DeepSpeed checkpoint directory without a model-states file "
                                  f"(*mp_rank_00_model_states.pt in {tag})")
            saved = load_zero_file(states[0])
        else:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except UnsafeCheckpointError as e:
        raise ConfigError(f"resume={ckpt}: {e}") from None
    except ConfigError:
        raise
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError/EOFError for a damaged or foreign file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "unsupported global" in line.lower()), lines[0].split(". ")[0])
        raise ConfigError(f"resume checkpoint {ckpt} cannot be loaded safely (weights_only=True): {why[:200]}") from None
    hparams = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    if (not isinstance(saved, dict) or not {"global_step", "loops"} <= saved.keys() or not isinstance(hparams, dict)
            or "model" not in hparams or "labels" in hparams):  # a fine-tuning checkpoint records its labels
        raise ConfigError(f"resume={ckpt}: not a pretraining checkpoint (a Lightning checkpoint written by "
                          f"roberta-pl-train holds the step, loop state and model settings); pass checkpoints/last.ckpt or a step-*.ckpt "
                          f"of a run, or resume=auto")
    return saved


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


def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and Slurm's ``hpc_ckpt_*.ckpt`` in the run directory; a DeepSpeed
    directory counts once one of its saves completed (its first, killed half-way, left none)."""
    from roberta_pl.checkpoints import zero_tag_dir

    candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")]
                  if p.is_file() or zero_tag_dir(p) is not None]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
