"""Continue pretraining an existing encoder (``pretrained=PATH``): what it fixes and what stays the run's.

PATH is read with the same loader as fine-tuning (:func:`roberta_pl.checkpoints.read_pretrained` and
:func:`~roberta_pl.checkpoints.load_pretrained`): a HuggingFace RoBERTa-family directory (``roberta``,
``xlm-roberta``, ``camembert``, ``roberta-prelayernorm``) or a ModernBERT one (``modernbert``), one of our ``.ckpt`` files or a DeepSpeed directory. It
fixes the architecture (its config, not the ``model=`` preset) and the tokenizer (the HF directory's own files, or
the one a checkpoint records): a ``model.*`` key that would change the architecture is refused, and a
``data.tokenizer`` is accepted only with the hash of PATH's. What only changes how the run trains stays settable.
The encoder and the MLM head (the tied decoder, the head's dense, LayerNorm and bias) start from PATH's weights; a
resumed run starts from its own checkpoint instead and leaves PATH unread but for its config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from roberta_pl.checkpoints import PretrainedInfo
from roberta_pl.errors import ConfigError

# The model.* keys a continued run may set: they change how it trains, not what PATH's weights mean. Every other
# RobertaConfig field is PATH's (`name`, the preset's, means nothing here; `compile` is the run's).
TRAINING_KEYS = ("dropout", "attention_dropout", "activation_checkpointing", "pad_vocab_multiple")
# ModernBERT has no position table: a continued run may lengthen its context and raise its RoPE bases, as ModernBERT's
# own long-context phase did (1,024 -> 8,192 tokens, global base 10k -> 160k); docs/guides/modernbert.md.
CONTEXT_KEYS = ("max_seq_len", "global_rope_theta", "local_rope_theta")


def settable_keys(config) -> tuple[str, ...]:
    """The ``model.*`` keys a run continued from a model of ``config`` may set."""
    return TRAINING_KEYS + (CONTEXT_KEYS if config.architecture == "modernbert" else ())


def read_source(cfg: DictConfig) -> PretrainedInfo | None:
    """What ``pretrained=PATH`` is (architecture, tokenizer, no weights), after refusing ``model.*`` keys that would
    change its architecture; None without ``pretrained``.

    Raises:
        ConfigError: one line naming PATH or the refused key.
    """
    if cfg.pretrained is None:
        return None
    from data_pipelines.errors import DataError
    from roberta_pl.checkpoints import read_pretrained

    path = Path(cfg.pretrained)
    if not path.exists():
        raise ConfigError(f"pretrained={cfg.pretrained}: no such file or directory (a HuggingFace RoBERTa directory, a "
                          f"roberta-pl .ckpt or a DeepSpeed checkpoint directory)")
    try:
        source = read_pretrained(path, cfg.data.tokenizer, flag="data.tokenizer=DIR")
    except (FileNotFoundError, ValueError, KeyError, DataError) as e:  # KeyError: a state dict of another shape
        raise ConfigError(f"pretrained={cfg.pretrained}: {e.args[0] if e.args else e}") from None
    check_model_group(cfg, source.config.architecture)
    check_model_keys(cfg, settable_keys(source.config))
    return source


def check_model_group(cfg: DictConfig, architecture: str) -> None:
    """Refuse a chosen ``model=`` group of another architecture than PATH's (``architecture``): its fields equal its
    own preset's, so :func:`chosen_model_keys` sees none of them, and the run would quietly continue PATH's model.
    The group is chosen when named on the command line or when it is not pretrain.yaml's default (an ``experiment=``)."""
    from roberta_pl.config import CONF_DIR
    from roberta_pl.safety import command_line_overrides

    group = str(cfg.model.get("architecture", "roberta"))
    default = next(d["model"] for d in OmegaConf.load(CONF_DIR / "pretrain.yaml").defaults
                   if isinstance(d, DictConfig) and "model" in d)
    named = any(arg.partition("=")[0].lstrip("+~") == "model" for arg in command_line_overrides())
    if group != architecture and (named or cfg.model.name != default):
        raise ConfigError(f"model={cfg.model.name} is a {group} model but pretrained={cfg.pretrained} is a "
                          f"{architecture} one, and PATH fixes the architecture; drop model= (PATH's config is used)")


def chosen_model_keys(cfg: DictConfig) -> list[str]:
    """The ``model.*`` fields this run chose: named on the command line, or given a value other than the one the
    model group's preset (``model.name``; RobertaConfig's defaults for another group) gives them, as an
    ``experiment=`` file may. ``model.vocab_size`` is chosen whenever it is set."""
    from roberta_pl.model import PRESETS, RobertaConfig
    from roberta_pl.safety import command_line_overrides

    preset = PRESETS.get(str(cfg.model.name), RobertaConfig())
    model = OmegaConf.to_container(cfg.model, resolve=True)
    chosen = {f.name for f in dataclasses.fields(RobertaConfig) if f.name != "vocab_size"
              and f.name in model and model[f.name] != getattr(preset, f.name)}
    chosen |= {"vocab_size"} if model.get("vocab_size") is not None else set()
    chosen |= {arg.partition("=")[0].removeprefix("model.") for arg in command_line_overrides()
               if arg.startswith("model.") and "=" in arg}
    return sorted(chosen & {f.name for f in dataclasses.fields(RobertaConfig)})


def check_model_keys(cfg: DictConfig, settable: tuple[str, ...] = TRAINING_KEYS) -> None:
    """Refuse ``model.*`` keys that would change the architecture ``pretrained=PATH`` fixes (one line naming them);
    ``settable``: the keys PATH's architecture leaves to the run (:func:`settable_keys`)."""
    refused = [k for k in chosen_model_keys(cfg) if k not in settable]
    if refused:
        keys = ", ".join(f"model.{k}={cfg.model[k]}" for k in refused)
        raise ConfigError(f"{keys}: pretrained={cfg.pretrained} fixes the architecture (its config, not a model preset); "
                          f"drop {'it' if len(refused) == 1 else 'them'} (settable: "
                          f"{', '.join('model.' + k for k in (*settable, 'compile'))})")


def continued_tokenizer(cfg: DictConfig, source: PretrainedInfo):
    """The loaded tokenizer of a continued run: ``data.tokenizer`` if it is the one PATH was trained with (same
    content hash), else PATH's own.

    Raises:
        ConfigError: PATH has no tokenizer and none was given, or ``data.tokenizer`` is another tokenizer.
    """
    from data_pipelines.tokenizer import load_tokenizer

    if source.tokenizer is None:
        raise ConfigError(f"pretrained={source.path} has no tokenizer of its own (no tokenizer.json, vocab.json, "
                          f"sentencepiece.bpe.model or recorded tokenizer); pass data.tokenizer=DIR, the tokenizer it "
                          f"was trained with")
    tokenizer = load_tokenizer(source.tokenizer)
    if source.tokenizer_hash is not None and tokenizer.hash != source.tokenizer_hash:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is tokenizer {tokenizer.hash}, but pretrained="
                          f"{source.path} was trained with tokenizer {source.tokenizer_hash}; drop data.tokenizer to use "
                          f"its own (and write shards with it: roberta-pl-data shards CORPUS --tokenizer "
                          f"{source.path if source.path.is_dir() else 'ITS_TOKENIZER'})")
    return tokenizer


def model_settings(cfg: DictConfig, tokenizer_vocab: int, source: PretrainedInfo | None) -> dict[str, Any]:
    """The :class:`~roberta_pl.model.RobertaConfig` fields the run trains: ``cfg.model`` with the tokenizer's
    vocabulary, or PATH's config with the training keys this run chose."""
    from roberta_pl.config import model_settings as from_model_group
    from roberta_pl.pretraining.checks import check_vocab

    if source is None:
        model = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
        return from_model_group(model, check_vocab(cfg.model.vocab_size, tokenizer_vocab))
    check_vocab(source.config.vocab_size, tokenizer_vocab)
    chosen = [k for k in chosen_model_keys(cfg) if k in settable_keys(source.config)]
    return source.config.to_dict() | {k: cfg.model[k] for k in chosen}


def initialise(model, source: PretrainedInfo | None, resuming: bool) -> None:
    """Load PATH's encoder and MLM head into ``model`` (our masked LM of its architecture, built from
    :func:`model_settings`); nothing without ``pretrained``, or when the run resumes from its own checkpoint.

    The weights go through the HF key table both ways (:func:`~roberta_pl.hf.to_hf_state_dict`, then
    :func:`~roberta_pl.hf.convert_hf_state_dict`), which accounts for every key and re-pads the vocabulary rows to
    this run's ``pad_vocab_multiple``.
    """
    if source is None or resuming:
        return
    from roberta_pl.checkpoints import load_pretrained
    from roberta_pl.hf import convert_hf_state_dict, tied_decoder_key, to_hf_state_dict

    try:  # a directory whose weights cannot be ours (an untied decoder) is refused in one line, before training
        loaded, _ = load_pretrained(source.path, source.tokenizer)  # the tokenizer was checked already
    except (ValueError, KeyError) as e:
        raise ConfigError(f"pretrained={source.path}: {e.args[0] if e.args else e}") from None
    state = convert_hf_state_dict(to_hf_state_dict(loaded), model.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing != [tied_decoder_key(model.config)] or unexpected:  # the decoder is tied to the word embeddings
        raise RuntimeError(f"pretrained={source.path}: weights did not load whole (missing {missing}, unexpected "
                           f"{unexpected})")


def describe_source(source: PretrainedInfo) -> str:
    """One line: what a fresh continued run starts from."""
    from roberta_pl.hf import hf_model_type

    c = source.config
    return (f"Continuing pretraining from {source.path}: its encoder and MLM head ({hf_model_type(c)}, {c.num_layers} "
            f"layers x {c.hidden_size}, vocab {c.vocab_size}) and its tokenizer {source.tokenizer}")
