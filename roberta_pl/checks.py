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
from roberta_pl.loggers import check_logger
from roberta_pl.optim import BatchPlan, BatchPlanError, parse_duration, plan_batch, plan_schedule


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
    """Refuse a pretraining config that cannot run, before any work. Returns the run's batch plan (ramp
    phases included), the only one computed."""
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
    plan = plan_schedule(b.global_batch_size, b.micro_batch_size, world_size(cfg), b.seq_len, b.ramp)
    check_budget(cfg)
    if b.ramp and t.strategy == "deepspeed":
        raise ConfigError("batch.ramp is not supported with trainer.strategy=deepspeed (DeepSpeed fixes accumulation "
                          "at start-up); drop the ramp or use ddp")
    if t.strategy == "deepspeed" and t.accelerator == "cpu" and str(t.precision) in ("16-mixed", "16", "16-true"):
        # DeepSpeed's CPU accelerator has fp16 only where oneDNN does; where it does, this project's CPU fp16
        # path (a GradScaler plugin, precision_setting) would still replace DeepSpeed's own loss scaling.
        raise ConfigError(f"trainer.precision={t.precision} is not supported with trainer.strategy=deepspeed on "
                          f"trainer.accelerator=cpu; use trainer.precision=bf16-mixed or 32-true (or fp16 on GPUs)")
    if t.strategy == "deepspeed" and t.nonfinite_loss == "skip" and str(t.precision) not in ("16-mixed", "16"):
        # DeepSpeed's engine steps at the end of its accumulation window whatever a callback zeroes, and skips a step
        # only when fp16 gradients overflow (then every rank skips, and LossScaleMonitor reports it).
        raise ConfigError(f"trainer.nonfinite_loss=skip is not supported with trainer.strategy=deepspeed at "
                          f"trainer.precision={t.precision} (DeepSpeed drops a step only under fp16 loss scaling); use "
                          f"trainer.nonfinite_loss=stop (resume=auto restarts from the last checkpoint) or trainer=ddp")
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


def check_budget(cfg: DictConfig) -> float | None:
    """The seconds of ``trainer.max_time`` (None without one), and the settings a time budget or a mask-rate
    schedule needs; one line naming the field and value otherwise."""
    t, d = cfg.trainer, cfg.data
    if d.mask_prob_start is not None and not 0.0 < d.mask_prob_start < 1.0:
        raise ConfigError(f"data.mask_prob_start={d.mask_prob_start}: a rate in (0, 1), e.g. 0.3 (Ankner et al., 2023)")
    if t.max_time is None:
        return None
    try:
        seconds = parse_duration(t.max_time)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.optim.warmup_steps < 4:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps}: trainer.max_time measures the step rate inside "
                          f"the LR warm-up, which needs at least 4 steps")
    return seconds


def preflight_finetune(cfg: DictConfig, out_dir: Path) -> BatchPlan:
    """Refuse a fine-tuning config that cannot run, before any work. Returns the run's batch plan."""
    task = cfg.task
    if cfg.pretrained is None:
        raise ConfigError("pretrained=PATH is required: a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir")
    if not Path(cfg.pretrained).exists():
        raise ConfigError(f"pretrained={cfg.pretrained}: no such file or directory")
    if cfg.init not in ("pretrained", "random"):
        raise ConfigError(f"init={cfg.init}: choose pretrained or random")
    if task.kind not in ("sequence_classification", "token_classification"):
        raise ConfigError(f"task.kind={task.kind}: choose sequence_classification or token_classification")
    for field in ("train_file", "valid_file"):
        if task.get(field) is None:
            raise ConfigError(f"task.{field} is required (or task.data_dir=DIR for a preset)")
    for field in ("train_file", "valid_file", "test_file"):
        if task.get(field) is not None and not Path(task[field]).is_file():
            raise ConfigError(f"task.{field}={task[field]}: no such file")
    from roberta_pl.finetune.module import available_metrics

    metrics = available_metrics(task.kind, task.regression)
    if task.metric not in metrics:
        raise ConfigError(f"task.metric={task.metric}: choose one of {', '.join(metrics)} for this task")
    if task.max_seq_len < 8:
        raise ConfigError(f"task.max_seq_len={task.max_seq_len} is too short")
    if cfg.trainer.strategy == "deepspeed":
        raise ConfigError("trainer.strategy=deepspeed is for pretraining; fine-tune with trainer=gpu or trainer=ddp")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.max_epochs <= 0:
        raise ConfigError("set trainer.max_epochs or trainer.max_steps to a positive number")
    world = world_size(cfg)
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    try:
        plan = plan_batch(cfg.batch_size, micro, world, task.max_seq_len)
    except BatchPlanError:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split into micro-batches of {micro} on {world} "
                          f"rank(s); make batch_size a multiple of micro_batch_size x ranks") from None
    if (out_dir / "checkpoints" / "best.ckpt").exists() and not cfg.overwrite:
        raise ConfigError(f"run_dir={out_dir} already holds a fine-tuned model (checkpoints/best.ckpt); "
                          f"choose another run_name or pass overwrite=true")
    check_writable(out_dir)
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
                 "pad_vocab_multiple", "pad_token_id", "bos_token_id", "eos_token_id", "pre_layernorm")


def read_checkpoint(ckpt: Path) -> dict:
    """A Lightning training checkpoint read with ``weights_only=True`` (no pickled code runs) and memory-mapped
    (tensors are not read until used). A DeepSpeed checkpoint directory keeps the Lightning part in its current
    save's ``*mp_rank_00_model_states.pt`` (ZeRO-3 prefixes it with ``zero_pp_rank_0_``); every file of that save is
    read the same way first, since DeepSpeed's own load and conversion unpickle them with ``weights_only=False``.

    Raises:
        ConfigError: one line naming the file or directory: pickled code or damage, a directory that is not a
            DeepSpeed checkpoint, or a file that is not a training checkpoint.
    """
    from roberta_pl.checkpoints import UnsafeCheckpointError, load_zero_file, vet_zero_checkpoint, zero_tag_dir

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


def check_resume_checkpoint(ckpt: Path, saved: dict, model: dict, tokenizer_hash: str,
                            strategy: str | None = None) -> None:
    """Refuse, before training, a resume checkpoint from another model size or tokenizer, or of the other kind
    than ``strategy`` loads (a DeepSpeed directory needs ``deepspeed``, which loads nothing else).

    Args:
        ckpt: the checkpoint the run would resume from.
        saved: what :func:`read_checkpoint` returned for it (read once per run).
        model: this run's model fields (``vocab_size`` resolved).
        tokenizer_hash: the content hash of this run's tokenizer.
        strategy: this run's ``trainer.strategy`` (None: not checked).

    Raises:
        ConfigError: one line naming the checkpoint, the field and both values.
    """
    if strategy is not None and ckpt.is_dir() != (strategy == "deepspeed"):
        kind = "a DeepSpeed checkpoint directory" if ckpt.is_dir() else "a single-file checkpoint"
        fix = ("resume it with trainer=deepspeed_zero2 or deepspeed_zero3 (the stage it was written with), or export it "
               "(roberta-pl-export) and continue with pretrained=" if ckpt.is_dir() else
               "DeepSpeed resumes only its own checkpoint directories; resume it with trainer=ddp, cpu or gpu")
        raise ConfigError(f"resume checkpoint {ckpt} is {kind} but trainer.strategy={strategy}; {fix}")
    hp = dict(saved.get("hyper_parameters") or {})
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


def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and Slurm's ``hpc_ckpt_*.ckpt`` in the run directory; a DeepSpeed
    directory counts once one of its saves completed (its first, killed half-way, left none)."""
    from roberta_pl.checkpoints import zero_tag_dir

    candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")]
                  if p.is_file() or zero_tag_dir(p) is not None]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
