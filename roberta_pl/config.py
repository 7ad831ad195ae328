"""Typed schemas for the Hydra config tree in ``conf/``.

Each group's YAML merges into one of these dataclasses, so a misspelt key or a wrong type fails when the
config is composed, before any work starts. Defaults here are the CPU-friendly ones; the YAML files say
where each paper value comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from roberta_pl.choices import choices
from roberta_pl.model import RobertaConfig
from roberta_pl.optim import Decay

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Choices a misspelling of which fails when Hydra composes the config, naming the allowed values.
Accelerator = choices("Accelerator", ["cpu", "gpu", "cuda", "mps", "auto"])
Strategy = choices("Strategy", ["auto", "ddp", "deepspeed"])
NonFiniteLoss = choices("NonFiniteLoss", ["stop", "skip"])
LoggerKind = choices("LoggerKind", ["csv", "wandb", "tensorboard", "none"])
WandbMode = choices("WandbMode", ["offline", "online", "disabled", "dryrun"])
# Lightning's precision names; not an enum, as they are not Python names ("32-true"): checked by check_choices.
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true", "64-true", "64")


@dataclass
class ModelConf(RobertaConfig):
    """The model group: every :class:`~roberta_pl.model.RobertaConfig` field, plus the preset name,
    a vocabulary taken from the tokenizer unless set, and ``torch.compile``."""

    name: str = "tiny"
    vocab_size: Optional[int] = None  # None: take the tokenizer's vocabulary size
    compile: bool = False  # torch.compile the encoder

    def __post_init__(self) -> None:
        pass  # checked when the RobertaConfig is built from it (the vocabulary is only known then)


def model_settings(model: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The :class:`~roberta_pl.model.RobertaConfig` fields of a resolved model group, with the vocabulary the
    tokenizer fixed: what the module and its checkpoints carry (the preset ``name`` and ``compile`` are the run's).

    Args:
        model: the resolved ``model`` group (``OmegaConf.to_container(cfg.model, resolve=True)``).
        vocab_size: the checked vocabulary size.
    """
    return {f.name: model[f.name] for f in fields(RobertaConfig) if f.name in model} | {"vocab_size": vocab_size}


@dataclass
class OptimConf:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay: Decay = Decay.linear  # the LR decay after the warm-up: one of roberta_pl.optim.DECAYS
    power: float = 1.0  # polynomial: the exponent
    end_lr_ratio: float = 0.0  # the LR at the last step, as a fraction of the peak
    # wsd (warmup-stable-decay): the last decay_steps steps decay, or when None the last decay_fraction of the steps
    # after the warm-up; before them the LR holds the peak. A time budget sizes the stable phase.
    decay_fraction: float = 0.2
    decay_steps: Optional[int] = None


@dataclass
class DeepSpeedConf:
    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class TrainerConf:
    accelerator: Accelerator = Accelerator.cpu
    devices: Any = 1
    num_nodes: int = 1
    strategy: Strategy = Strategy.auto  # deepspeed: ZeRO (trainer.deepspeed.stage)
    precision: str = "32-true"  # one of PRECISIONS (checked before any work): 32-true | bf16-mixed | 16-mixed | ...
    max_steps: int = 1000  # optimizer steps; also the length of the LR schedule
    # A wall-clock budget ("00:00:10:00", "2h", "10m"): max_steps is fixed from the step rate measured in the
    # warm-up (never above max_steps), saved in the checkpoint and reused on resume. None: max_steps decides.
    max_time: Optional[str] = None
    stop_at_step: Optional[int] = None  # end this job early (checkpointed); resume=auto continues the schedule
    val_every_n_steps: int = 200
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    gradient_clip_val: float = 0.0
    deterministic: bool = False
    enable_progress_bar: bool = True
    # A NaN/inf training loss: `stop` ends the run with the step named (the last checkpoint is kept);
    # `skip` drops that optimizer step's update and trains on. Under 16-mixed the GradScaler owns it.
    nonfinite_loss: NonFiniteLoss = NonFiniteLoss.stop
    # 16-mixed: stop when the GradScaler's loss scale falls below this (fairseq's --min-loss-scale):
    # every recent step overflowed, so training has collapsed rather than hit a rare spike.
    min_loss_scale: float = 1e-4
    # Extra Lightning callbacks, each {_target_: module.Class, ...}. `_target_`s must come from conf/
    # or the command line (see roberta_pl/safety.py).
    callbacks: list[Any] = field(default_factory=list)
    deepspeed: DeepSpeedConf = field(default_factory=DeepSpeedConf)


@dataclass
class LoggerConf:
    kind: LoggerKind = LoggerKind.csv
    project: str = "roberta-pl"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.offline  # W&B: offline unless asked for online (dryrun: W&B's old name for offline)
    tags: list[str] = field(default_factory=list)


def check_known_keys(cfg: DictConfig, schema: type) -> None:
    """Refuse keys the schema does not have, including ones added with Hydra's ``+key=value`` (which bypasses
    the schema's struct mode: ``+optim.lrr=1e-3`` would train with the default lr and record ``lrr``).

    Raises:
        ConfigError: one line naming the key and the nearest valid ones.
    """
    import difflib

    from roberta_pl.errors import ConfigError

    def walk(node: Any, ref: Any, prefix: str) -> None:
        if not isinstance(node, DictConfig) or not isinstance(ref, DictConfig):
            return
        ref_items = dict(ref.items_ex(resolve=False))
        for key, value in node.items_ex(resolve=False):
            path = f"{prefix}{key}"
            if key not in ref_items:
                near = difflib.get_close_matches(str(key), [str(k) for k in ref_items], n=2)
                hint = f"; did you mean {' or '.join(prefix + n for n in near)}?" if near else ""
                raise ConfigError(f"unknown config key {path}{hint}")
            walk(value, ref_items[key], f"{path}.")  # free-form values (dict, Any) are not DictConfigs in ref

    walk(cfg, OmegaConf.structured(schema), "")


def check_override_keys(args: Sequence[str], schema: type, conf_dir: Path = CONF_DIR) -> None:
    """Refuse a command-line override of a key the schema does not have, before Hydra composes (Hydra's own error
    advises adding such a key with ``+``, which :func:`check_known_keys` then refuses). Group choices
    (``model=base``), ``+``/``~`` overrides, ``hydra.*`` and flags are left to Hydra.

    Raises:
        ConfigError: one line naming the key and the nearest valid ones.
    """
    import difflib

    from roberta_pl.errors import ConfigError

    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    root = OmegaConf.structured(schema)
    for arg in args:
        key = arg.partition("=")[0]
        if "=" not in arg or arg.startswith(("-", "+", "~")) or key in groups or key.split(".")[0] == "hydra" \
                or any(c in key for c in "/@[$"):
            continue
        node, prefix = root, ""
        for part in key.split("."):
            if not isinstance(node, DictConfig) or node._is_none() or part.isdigit():
                break  # a free-form value (a dict or list field): its keys are the user's
            items = dict(node.items_ex(resolve=False))
            if part not in items:
                near = difflib.get_close_matches(part, [str(k) for k in items], n=2)
                hint = f"; did you mean {' or '.join(prefix + n for n in near)}?" if near else \
                    f"; {prefix.rstrip('.') or 'the config'} has {', '.join(prefix + str(k) for k in items)}"
                raise ConfigError(f"unknown config key {key}{hint}")
            node, prefix = node._get_node(part), f"{prefix}{part}."


def preset_yaml(name: str) -> str:
    """The text of ``conf/model/<name>.yaml``, generated from :data:`roberta_pl.model.PRESETS`: the one preset
    table, with a parameter count computed on the meta device (the vocabulary's padding rows excluded, as in an
    export). ``vocab_size`` is left to the tokenizer."""
    import dataclasses

    import torch

    from roberta_pl.model import PRESET_SOURCES, PRESETS, RobertaConfig
    from roberta_pl.models import masked_lm

    c = PRESETS[name]
    with torch.device("meta"):
        params = masked_lm(dataclasses.replace(c, pad_vocab_multiple=1)).num_parameters()
    lines = [f"# {PRESET_SOURCES[name]}: L={c.num_layers}, H={c.hidden_size}, A={c.num_heads}, "
             f"FFN {c.intermediate_size}; {params / 1e6:.2f}M parameters with a {c.vocab_size}-token vocabulary.",
             "# Generated from roberta_pl/model.py PRESETS by `python -m roberta_pl.config`: edit the table, not this file.",
             f"name: {name}", f"hidden_size: {c.hidden_size}", f"num_layers: {c.num_layers}",
             f"num_heads: {c.num_heads}", f"intermediate_size: {c.intermediate_size}", f"max_seq_len: {c.max_seq_len}"]
    if c.pad_vocab_multiple != 1:
        lines.append(f"pad_vocab_multiple: {c.pad_vocab_multiple}  # tensor-core friendly rows; padding never "
                     f"reaches the loss or an export")
    if c.architecture != "roberta":  # its own fields, and the defaults it does not share with RoBERTa's
        default, always = RobertaConfig(), ("local_attention", "global_attn_every_n_layers", "global_rope_theta",
                                            "local_rope_theta")
        shown = {"vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len",
                 "pad_vocab_multiple"}
        lines += [f"{f.name}: {getattr(c, f.name)}" for f in dataclasses.fields(c) if f.name not in shown
                  and (f.name in always or getattr(c, f.name) != getattr(default, f.name))]
    return "\n".join(lines) + "\n"


def help_with_presets(text: str) -> str:
    """``conf/pretrain.yaml`` with its help's ``model:`` line listing the presets of the table."""
    import re

    from roberta_pl.model import PRESETS

    return re.sub(r"(?m)^(\s+model: ).*$", lambda m: m.group(1) + ", ".join(PRESETS), text, count=1)


if __name__ == "__main__":  # rewrite conf/model/*.yaml and the help's preset list from the preset table
    from roberta_pl.model import PRESETS

    for preset in PRESETS:
        (CONF_DIR / "model" / f"{preset}.yaml").write_text(preset_yaml(preset))
        print(f"wrote {CONF_DIR / 'model' / f'{preset}.yaml'}")
    main_config = CONF_DIR / "pretrain.yaml"
    main_config.write_text(help_with_presets(main_config.read_text()))
    print(f"wrote the model presets into {main_config}'s help")
