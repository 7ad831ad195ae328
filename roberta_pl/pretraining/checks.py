"""Checks a pretraining run passes before any expensive work: the config (preflight), the resume checkpoint."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from roberta_pl.batch_plan import BatchPlan, parse_duration, plan_schedule
from roberta_pl.checks import (
    check_free_space,
    check_model_and_optim,
    check_precision,
    check_writable,
    find_resume_checkpoint,
    read_checkpoint,
    world_size,
)
from roberta_pl.errors import ConfigError
from roberta_pl.loggers import check_logger
from roberta_pl.probe import check_probe

if TYPE_CHECKING:
    from roberta_pl.checkpoints import PretrainedInfo


def preflight(cfg: DictConfig, out_dir: Path, source: PretrainedInfo | None = None) -> BatchPlan:
    """Refuse a pretraining config that cannot run, before any work. Returns the run's batch plan (ramp
    phases included), the only one computed. ``source``: what ``pretrained=`` names (its architecture), if set."""
    t, b = cfg.trainer, cfg.batch
    check_logger(cfg)
    check_precision(cfg)
    check_model_and_optim(cfg)
    check_masking(cfg)
    check_probe(cfg)
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={t.accelerator} but no CUDA GPU is visible; use trainer=cpu, or add "
                          f"trainer.accelerator=cpu (DDP and DeepSpeed ZeRO also run on CPU ranks)")
    max_seq_len, which = (source.config.max_seq_len, f"pretrained={cfg.pretrained}'s max_seq_len") if source \
        else (cfg.model.max_seq_len, "model.max_seq_len")
    if source and "max_seq_len" in _longer_context_keys(cfg, source):  # RoPE: a continued ModernBERT may lengthen it
        max_seq_len, which = cfg.model.max_seq_len, "model.max_seq_len"
    if b.seq_len > max_seq_len:
        rows = "" if (source.config if source else cfg.model).architecture == "modernbert" else \
            f" (the position table has {max_seq_len + 2} rows)"
        raise ConfigError(f"batch.seq_len={b.seq_len} exceeds {which}={max_seq_len}{rows}")
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
        if cfg.data.tokenizer is None and source is None:  # a continued run's default is the model's own
            raise ConfigError("data.tokenizer is required with data.train_shards (the tokenizer the shards were made with)")
        if cfg.data.tokenizer is not None and not Path(cfg.data.tokenizer).is_dir():
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



def check_masking(cfg: DictConfig) -> None:
    """The masking recipe of ``cfg.data`` is valid (rates, strategy settings): the data side's own check, run here,
    before any data is prepared."""
    from roberta_pl.pretraining.data import masking_config

    try:
        masking_config(cfg)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


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
    if cfg.optim.decay == "wsd" and cfg.optim.get("decay_steps") is not None:
        # A re-plan moves the last step, and a decay over the last N steps would then restart from the peak or jump.
        raise ConfigError(f"optim.decay_steps={cfg.optim.decay_steps}: trainer.max_time re-plans the last step during "
                          f"the run; give wsd's decay as a share of the steps (optim.decay_fraction) instead")
    return seconds



# Fields that fix parameter shapes or token meaning: a checkpoint must agree on all of them to resume.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len",
                 "pad_vocab_multiple", "pad_token_id", "bos_token_id", "eos_token_id", "pre_layernorm", "architecture")
# ModernBERT's attention pattern and RoPE bases change what its weights compute, so a resume keeps them too; a longer
# context with raised bases is a new run continued with pretrained=CKPT (init.CONTEXT_KEYS), not a resume.
_MODERNBERT_FIELDS = ("local_attention", "global_attn_every_n_layers", "global_rope_theta", "local_rope_theta")



def describe_resume(ckpt: Path, state: dict, wandb_id: str | None = None) -> str:
    """One line saying what a resume continues from: the checkpoint, its step (``state`` is what
    :func:`read_checkpoint` returned for it), the data position, the W&B run."""
    data = state.get("MLMDataModule") or {}
    parts = [f"step {state.get('global_step', '?')}"]
    if "consumed" in data:
        ranks = data.get("world_size", "?")
        parts.append(f"data position {data['consumed']} micro-batches per rank ({ranks} rank{'' if ranks == 1 else 's'} "
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
    fields = _SHAPE_FIELDS + (_MODERNBERT_FIELDS if model.get("architecture") == "modernbert" else ())
    diffs = [f"model.{k}={saved[k]} in the checkpoint but {model[k]} here" for k in fields
             if k in saved and k in model and saved[k] != model[k]]
    saved_hash = hp.get("tokenizer_hash")
    if saved_hash is not None and saved_hash != tokenizer_hash:
        diffs.append(f"tokenizer {saved_hash} in the checkpoint but {tokenizer_hash} here (data.tokenizer)")
    if diffs:
        raise ConfigError(f"resume checkpoint {ckpt} does not fit this run: {'; '.join(diffs)}; "
                          f"match the config, or start a new run (another run_name, or resume=never in a new run_dir)")



def _longer_context_keys(cfg: DictConfig, source: PretrainedInfo) -> set[str]:
    """The context keys (max_seq_len, RoPE bases) a run continued from ``source`` sets itself."""
    from roberta_pl.pretraining import init

    return set(init.chosen_model_keys(cfg)) & set(init.settable_keys(source.config)) & set(init.CONTEXT_KEYS)


def checkpoint_bytes(model: dict) -> int:
    """Bytes one checkpoint of this model takes: fp32 weights plus AdamW's two moments, plus 10% slack."""
    from roberta_pl.model import RobertaConfig
    from roberta_pl.models import masked_lm

    with torch.device("meta"):  # shapes only: nothing is allocated
        n = sum(p.numel() for p in masked_lm(RobertaConfig(**model)).parameters())
    return int(n * 4 * 3 * 1.1)



def check_vocab(model_vocab: int | None, tokenizer_vocab: int) -> int:
    """The model's vocabulary: the tokenizer's unless set, and never smaller than it."""
    if model_vocab is None:
        return tokenizer_vocab
    if tokenizer_vocab > model_vocab:
        raise ConfigError(f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size={model_vocab}; "
                          f"ids >= {model_vocab} would index past the embedding table")
    return model_vocab



@dataclass
class ResumePoint:
    """Where a pretraining run starts: the checkpoint to resume (None: from scratch) as read, and for a run that
    already finished, its summary instead (``finished``)."""

    ckpt: Path | None = None
    saved: dict | None = None
    finished: dict | None = None


def resume_point(cfg: DictConfig, out_dir: Path, model: dict, tokenizer_hash: str) -> ResumePoint:
    """Clear what killed saves left, find the checkpoint ``resume`` names and refuse it here (not half-way into
    fit) if it does not fit the model, tokenizer or strategy, and check the disk has room for checkpoints. Read
    without running pickled code."""
    from roberta_pl.callbacks import fixed_max_steps
    from roberta_pl.pretraining.outputs import finished_run

    rank_zero = not any(int(os.environ.get(v, 0) or 0) for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))
    if rank_zero:  # before any rank exists that could be saving: what killed saves left is garbage
        report_removed_saves(out_dir / "checkpoints")
    point = ResumePoint()
    point.ckpt = find_resume_checkpoint(out_dir) if cfg.resume == "auto" else None if cfg.resume == "never" \
        else Path(cfg.resume)
    if point.ckpt:
        point.saved = read_checkpoint(point.ckpt)  # memory-mapped, read once: the fit check, finished run, resume line
        check_resume_checkpoint(point.ckpt, point.saved, model, tokenizer_hash, cfg.trainer.strategy)
        # A time-budgeted run trains to the max_steps it fixed (saved in the checkpoint), not to the cap.
        fixed = fixed_max_steps(point.saved)
        point.finished = finished_run(point.ckpt, point.saved, fixed or cfg.trainer.max_steps, out_dir,
                                      budgeted=fixed is not None)
    if rank_zero and point.finished is None:
        check_free_space(out_dir, checkpoint_bytes(model))  # one probe per run, not one per rank
    return point


def report_removed_saves(folder: Path) -> None:
    """Remove what checkpoint saves killed half-way left in ``folder`` (see
    :func:`roberta_pl.checkpoints.remove_interrupted_saves`), saying so in one line."""
    from roberta_pl.checkpoints import remove_interrupted_saves

    removed = remove_interrupted_saves(folder)
    if removed:
        names = ", ".join(p.relative_to(folder).as_posix() for p in removed[:4]) + (", ..." if len(removed) > 4 else "")
        logging.getLogger("roberta_pl").info("Removed %d leftover(s) of checkpoint saves interrupted before they "
                                             "completed, in %s: %s", len(removed), folder, names)
