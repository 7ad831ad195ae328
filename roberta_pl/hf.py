"""HuggingFace interop: our masked-LM model <-> a ``transformers`` RoBERTa directory.

Our parameter names mirror HF's ``RobertaForMaskedLM``, so conversion is the table below plus two facts:
the decoder is tied to the word embeddings (HF stores it once), and our embedding table may be padded to a
multiple of 64 rows (those rows are dropped on save and re-added on load). A pre-LN model
(``pre_layernorm=True``) is written as HF's ``roberta-prelayernorm`` type: the same table with the encoder
under ``roberta_prelayernorm.`` and the LayerNorms where that architecture keeps them; one loaded from XLM-R or CamemBERT
(the same architecture under another model type) is written back as that type. No pooler is written (a
masked LM has none): ``AutoModelForMaskedLM``, the fill-mask pipeline and the classifier classes then load every
key without a report, and ``AutoModel`` reports its pooler MISSING (the README says where hidden states load
silently).

No ``transformers`` import here: ``config.json`` is written by hand so exporting works on a cluster that has
only the training dependencies. ``transformers.AutoModelForMaskedLM.from_pretrained(path)`` loads the result.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_pipelines.hf_tokenizer_files import HF_TOKENIZER_FILES
from data_pipelines.tokenizer import TOKENIZER_FILES as _OUR_TOKENIZER_FILES
from roberta_pl import hf_modernbert
from roberta_pl.model import (
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)
from roberta_pl.models import encoder, encoder_prefix, masked_lm

# HF key -> our key, identity by design (pre-LN renames the encoder's prefix only); ``_key_table`` expands the
# layers, and the table is the contract that every key is accounted for (strict check in ``convert_hf_state_dict``).
_EMBEDDING_KEYS = {
    "roberta.embeddings.word_embeddings.weight": "roberta.embeddings.word_embeddings.weight",
    "roberta.embeddings.position_embeddings.weight": "roberta.embeddings.position_embeddings.weight",
    "roberta.embeddings.token_type_embeddings.weight": "roberta.embeddings.token_type_embeddings.weight",
    "roberta.embeddings.LayerNorm.weight": "roberta.embeddings.LayerNorm.weight",
    "roberta.embeddings.LayerNorm.bias": "roberta.embeddings.LayerNorm.bias",
}
_LAYER_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)
# Pre-LN (HF ``RobertaPreLayerNormModel``): the block's two LayerNorms sit at the branch inputs instead, one more
# normalises the encoder's output, and the encoder is stored under ``roberta_prelayernorm.``.
_PRE_LN_LAYER_MODULES = tuple(
    {"attention.output.LayerNorm": "attention.LayerNorm", "output.LayerNorm": "intermediate.LayerNorm"}.get(m, m)
    for m in _LAYER_MODULES
)
_PRE_LN_FINAL_KEYS = {
    "roberta.LayerNorm.weight": "roberta.LayerNorm.weight",
    "roberta.LayerNorm.bias": "roberta.LayerNorm.bias",
}
_HEAD_KEYS = {
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
# Present in some HF checkpoints but carrying nothing we need: tied copies, buffers, the NSP-era pooler.
_IGNORED_HF_KEYS = re.compile(
    r"^(lm_head\.decoder\.(weight|bias)|roberta(_prelayernorm)?\.(embeddings\.position_ids|pooler\..*)|decoder\.weight)$"
)
# The tokenizer files an export copies, by name: ours, and those of HF RoBERTa-family tokenizers (byte-level BPE's
# vocab and merges, XLM-R's SentencePiece model) that continued pretraining and fine-tuning export again as they are.
TOKENIZER_FILES = tuple(dict.fromkeys((*_OUR_TOKENIZER_FILES, *HF_TOKENIZER_FILES)))
_VOCAB_SIZED = ("roberta.embeddings.word_embeddings.weight", "lm_head.bias", *hf_modernbert.VOCAB_SIZED)


# The transformers model types we read and write, and the prefix of their classes' names: ``RobertaForMaskedLM``,
# ``XLMRobertaForMaskedLM`` ... An export keeps the type it was loaded as (``RobertaConfig.hf_model_type``), so a
# model continued from XLM-R goes back out as XLM-R; all but pre-LN store the encoder under ``roberta.``.
_CLASS_PREFIX = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
                 "roberta-prelayernorm": "RobertaPreLayerNorm"}


def hf_model_type(config: RobertaConfig) -> str:
    """The transformers model type ``config`` is written as: the one it was loaded as, else ``roberta`` (or
    ``roberta-prelayernorm`` for a pre-LN model)."""
    if config.architecture == "modernbert":
        return hf_modernbert.MODEL_TYPE
    return config.hf_model_type or ("roberta-prelayernorm" if config.pre_layernorm else "roberta")


def hf_prefix(config: RobertaConfig) -> str:
    """The attribute HF names the encoder by (its ``base_model_prefix``): ``roberta`` or ``roberta_prelayernorm``."""
    return "roberta_prelayernorm" if config.pre_layernorm else encoder_prefix(config)


def _encoder_key_table(config: RobertaConfig) -> dict[str, str]:
    """HF key -> our key for the encoder of ``config`` (its architecture, depth and LayerNorm placement)."""
    if config.architecture == "modernbert":
        return hf_modernbert.encoder_key_table(config)
    modules = _PRE_LN_LAYER_MODULES if config.pre_layernorm else _LAYER_MODULES
    table = dict(_EMBEDDING_KEYS)
    for i in range(config.num_layers):
        table.update({f"roberta.encoder.layer.{i}.{m}.{p}": f"roberta.encoder.layer.{i}.{m}.{p}"
                      for m in modules for p in ("weight", "bias")})
    if not config.pre_layernorm:
        return table
    prefix = hf_prefix(config)
    return {f"{prefix}.{hf.removeprefix('roberta.')}": ours for hf, ours in (table | _PRE_LN_FINAL_KEYS).items()}


def _key_table(config: RobertaConfig) -> dict[str, str]:
    if config.architecture == "modernbert":
        return hf_modernbert.key_table(config)
    return _encoder_key_table(config) | _HEAD_KEYS


def config_to_hf(config: RobertaConfig, architecture: str = "RobertaForMaskedLM") -> dict:
    """Our config as a ``transformers`` config dict (what goes in ``config.json``).

    Args:
        config: our model config; its model type (:func:`hf_model_type`: ``roberta``, ``xlm-roberta``,
            ``camembert``, or ``roberta-prelayernorm`` for pre-LN) is written.
        architecture: the RoBERTa class name (``RobertaForMaskedLM``, ``RobertaForSequenceClassification`` ...);
            the model type's matching class is written (``XLMRobertaForMaskedLM``, ``RobertaPreLayerNorm...``).
    Returns:
        The ``config.json`` dict.
    """
    if config.architecture == "modernbert":
        return hf_modernbert.config_to_hf(config, architecture)
    model_type = hf_model_type(config)
    return {
        "architectures": [architecture.replace("Roberta", _CLASS_PREFIX[model_type], 1)],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_positions,
        "type_vocab_size": 1,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def config_from_hf(hf: dict) -> RobertaConfig:
    """Read a ``transformers`` RoBERTa-family ``config.json`` dict (``roberta``, ``xlm-roberta``, ``camembert``,
    ``roberta-prelayernorm``), keeping the model type for the export; refuses what our model cannot represent."""
    model_type = hf.get("model_type", "roberta")
    if model_type == hf_modernbert.MODEL_TYPE:
        return hf_modernbert.config_from_hf(hf)
    if model_type not in _CLASS_PREFIX:
        raise ValueError(f"config.json has model_type={model_type!r}; expected one of "
                         f"{', '.join((*_CLASS_PREFIX, hf_modernbert.MODEL_TYPE))}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json has hidden_act={hf['hidden_act']!r}; only 'gelu' is supported")
    if hf.get("type_vocab_size", 1) != 1:
        raise ValueError(f"config.json has type_vocab_size={hf['type_vocab_size']}; RoBERTa uses 1")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("config.json: only absolute position embeddings are supported")
    pad = hf.get("pad_token_id", 1)
    return RobertaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"] - pad - 1,
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=pad,
        bos_token_id=hf.get("bos_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 2),
        pre_layernorm=model_type == "roberta-prelayernorm",
        hf_model_type=model_type if model_type in ("xlm-roberta", "camembert") else None,  # roberta's are derived
    )


def convert_hf_state_dict(hf_state: dict[str, torch.Tensor], config: RobertaConfig) -> dict[str, torch.Tensor]:
    """Map an HF RoBERTa masked-LM state dict onto our names, padding vocab-sized tensors if configured.

    Raises:
        KeyError: naming the missing or unexpected keys, so a wrong architecture never loads silently.
        ValueError: the state dict's decoder is not its token embeddings (an untied model: ours ties them).
    """
    table = _key_table(config)
    decoder = tied_decoder_key(config)  # HF's name too; ignored below only when it is the embeddings' copy
    embedding = next(hf for hf, ours in table.items()
                     if ours in ("roberta.embeddings.word_embeddings.weight", "model.embeddings.tok_embeddings.weight"))
    if decoder in hf_state and embedding in hf_state and not torch.equal(hf_state[decoder], hf_state[embedding]):
        raise ValueError(f"{decoder} is not the token embeddings ({embedding}): an untied masked LM "
                         f"(tie_word_embeddings=false); roberta-pl's decoder is tied, so it would lose that matrix")
    unexpected = sorted(k for k in hf_state if k not in table and not _IGNORED_HF_KEYS.match(k))
    missing = sorted(k for k in table if k not in hf_state)
    if missing or unexpected:
        kind = {"modernbert": "ModernBERT"}.get(config.architecture,
                                                 "RoBERTa-PreLayerNorm" if config.pre_layernorm else "RoBERTa")
        raise KeyError(f"HF state dict does not match a {config.num_layers}-layer {kind} MLM: "
                       f"missing={missing[:5]}{'...' if len(missing) > 5 else ''} "
                       f"unexpected={unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return _pad_vocab({table[k]: v for k, v in hf_state.items() if k in table}, config)


def _pad_vocab(ours: dict[str, torch.Tensor], config: RobertaConfig) -> dict[str, torch.Tensor]:
    """Zero rows appended to the vocab-sized tensors present, up to ``config.padded_vocab_size``."""
    extra = config.padded_vocab_size - config.vocab_size
    for k in _VOCAB_SIZED:
        if extra and k in ours:
            ours[k] = torch.cat([ours[k], ours[k].new_zeros((extra, *ours[k].shape[1:]))])
    return ours


def _export_tensors(state: dict[str, torch.Tensor], table: dict[str, str], config: RobertaConfig) -> dict[str, torch.Tensor]:
    """``state`` (our names) → HF names per ``table`` (HF → ours), vocab padding dropped, CPU copies."""
    out = {}
    for hf, ours in table.items():
        t = state[ours].detach()
        if ours in _VOCAB_SIZED:
            t = t[: config.vocab_size]
        out[hf] = _export_tensor(t)
    return out


def _export_tensor(t: torch.Tensor) -> torch.Tensor:
    # fp32 on CPU whatever the training precision (bf16-true, fp16): config.json says float32.
    return t.detach().to("cpu", dtype=torch.float32 if t.is_floating_point() else t.dtype, copy=True).contiguous()


def to_hf_state_dict(model: RobertaForMaskedLM) -> dict[str, torch.Tensor]:
    """Our model's weights under HF names, vocab padding dropped, tied decoder stored once."""
    return _export_tensors(model.state_dict(), _key_table(model.config), model.config)


def save_hf(model: RobertaForMaskedLM, path: str | Path, tokenizer=None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and the tokenizer files, if given) to ``path``.

    Args:
        model: our masked-LM model.
        path: output directory (created).
        tokenizer: a tokenizer directory (the files :data:`TOKENIZER_FILES` names are copied, links refused) or an
            object with ``save_pretrained(path)``.
    Returns:
        The output directory.
    """
    return _write_hf_dir(path, to_hf_state_dict(model), config_to_hf(model.config), tokenizer)


def save_hf_classifier(model: RobertaForSequenceClassification | RobertaForTokenClassification, path: str | Path,
                       labels: list[str], regression: bool = False, tokenizer=None) -> Path:
    """Write a fine-tuned model that ``transformers.AutoModelForSequenceClassification`` (or
    ``AutoModelForTokenClassification``) loads with the same outputs.

    Args:
        model: our sequence- or token-classification model.
        path: output directory (created).
        labels: class names in logit order (``id2label``); for regression, one name for the score.
        regression: a single-score sequence regressor (``problem_type="regression"``).
        tokenizer: as for :func:`save_hf`.
    """
    config = model.config
    state = model.state_dict()
    tensors = _export_tensors(state, _encoder_key_table(config), config)
    prefix = encoder_prefix(config)  # the rest is the head: classifier.* (and ModernBERT's head.*)
    tensors |= {k: _export_tensor(v) for k, v in state.items() if not k.startswith(f"{prefix}.")}
    token = type(model).__name__.endswith("ForTokenClassification")
    hf_config = config_to_hf(config, "RobertaForTokenClassification" if token else "RobertaForSequenceClassification")
    hf_config |= {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "tie_word_embeddings": False,
    }
    if not token:
        hf_config["problem_type"] = "regression" if regression else "single_label_classification"
    return _write_hf_dir(path, tensors, hf_config, tokenizer)


def _write_hf_dir(path: str | Path, tensors: dict[str, torch.Tensor], hf_config: dict, tokenizer) -> Path:
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    # Everything is written into a private directory first and renamed into place at the end: a refused tokenizer
    # leaves nothing half-done in ``path``, and a link planted in ``path`` under one of our names is replaced, never
    # written through. Only files written here get a mode (readable as the umask allows, as ``open`` would make them:
    # safetensors writes 0600); nothing else in ``path``, and nothing outside it, is chmod-ed.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=path))
    try:
        if tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(staging)
            else:
                src = Path(getattr(tokenizer, "path", tokenizer))
                if src.resolve() != path.resolve():  # exporting into the tokenizer's own directory: already there
                    _copy_tokenizer_files(src, staging)
            _fit_tokenizer_to_model(staging, hf_config)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        mode = 0o666 & ~_umask()
        written = sorted((f for f in staging.iterdir() if f.is_file()), key=lambda f: f.name == "config.json")
        for f in written:
            f.chmod(mode)
        for f in written:  # config.json last: the directory loads only once the weights are in place
            os.replace(f, path / f.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return path


def _copy_tokenizer_files(src: Path, dest: Path) -> None:
    """Copy the tokenizer files of ``src`` that :data:`TOKENIZER_FILES` names into ``dest``, as new files.

    A tokenizer directory may come from a checkpoint's hyper-parameters, which anyone can edit: only known names
    are read (never an ``id_rsa`` beside them), and none through a symbolic link that leaves the directory. A link
    is followed only to a file inside the directory, or, for a HuggingFace hub snapshot (``snapshots/REV/NAME ->
    ../../blobs/SHA``, how every model fine-tuned from the hub cache holds its tokenizer), inside its repository's
    ``blobs``. Any other link is refused rather than skipped: an export without that file would silently not be
    the tokenizer the model was trained with.

    Raises:
        FileNotFoundError: ``src`` is not a directory.
        ValueError: one line naming the file that links elsewhere or is not a regular file.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {src}")
    root = src.resolve()
    inside = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    for name in TOKENIZER_FILES:
        file = src / name
        if file.is_symlink():
            try:
                target = file.resolve()
            except (OSError, RuntimeError):  # a loop of links
                target = None
            if target is None or not any(target.is_relative_to(d) for d in inside):
                raise ValueError(f"{file} is a symbolic link out of its directory (to {target}); an export copies "
                                 f"only the tokenizer directory's own files: replace the link with the file it points "
                                 f"to, or pass another tokenizer directory (--tokenizer DIR)")
            file = target
        try:  # O_NONBLOCK: a FIFO under a known name is refused below instead of blocking the open
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise ValueError(f"{file}: replaced by a symbolic link while the export read it") from None
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{file} is not a regular file; an export copies only regular files of the "
                                 f"tokenizer directory")
            with open(dest / name, "xb") as out:
                shutil.copyfileobj(fh, out)


def _fit_tokenizer_to_model(path: Path, hf_config: dict) -> None:
    """Record the model's real length in ``tokenizer_config.json``: a tokenizer trained for 512 tokens beside a
    model with 130 position rows lets ``truncation=True`` (and every pipeline) pass inputs the model cannot
    index. RoBERTa's positions start after the padding id, so the model takes ``max_position_embeddings - 2``."""
    config_path = path / "tokenizer_config.json"
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    offset = 0 if hf_config["model_type"] == hf_modernbert.MODEL_TYPE else int(hf_config.get("pad_token_id", 1)) + 1
    config["model_max_length"] = int(hf_config["max_position_embeddings"]) - offset
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``model.safetensors`` or, failing that, ``pytorch_model.bin`` (loaded weights-only)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def read_hf_config(path: Path, **config_overrides) -> RobertaConfig:
    """Our config from a HF directory's ``config.json``, with field overrides."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: not a HuggingFace model directory")
    config = config_from_hf(json.loads(config_file.read_text()))
    return RobertaConfig(**{**config.to_dict(), **config_overrides}) if config_overrides else config


def load_hf(path: str | Path, **config_overrides) -> RobertaForMaskedLM:
    """Build our masked-LM model from a HuggingFace RoBERTa directory.

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).
        config_overrides: fields of :class:`RobertaConfig` to change (e.g. ``pad_vocab_multiple=64``, dropout).
    Returns:
        A :class:`RobertaForMaskedLM` in eval mode.
    """
    path = Path(path)
    config = read_hf_config(path, **config_overrides)
    model = masked_lm(config)
    try:
        state = convert_hf_state_dict(load_hf_state_dict(path), config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == [tied_decoder_key(config)], (missing, unexpected)
    return model.eval()


def tied_decoder_key(config: RobertaConfig) -> str:
    """The one key our masked LM's state dict holds that the table does not: the decoder tied to the embeddings."""
    return hf_modernbert.TIED_KEY if config.architecture == "modernbert" else "lm_head.decoder.weight"


def load_hf_encoder(path: str | Path, **config_overrides) -> RobertaModel:
    """The bare encoder of any HuggingFace RoBERTa or RoBERTa-PreLayerNorm directory: a masked-LM, a classifier,
    or a bare ``RobertaModel`` (whose keys carry no ``roberta.`` prefix). Heads and the pooler are ignored.

    Raises:
        FileNotFoundError: no ``config.json``.
        KeyError: naming the encoder keys the directory lacks.
    """
    path = Path(path)
    config = read_hf_config(path, **config_overrides)
    hf_state = load_hf_state_dict(path)
    prefix = hf_prefix(config)
    if not any(k.startswith(f"{prefix}.") for k in hf_state):  # RobertaModel.save_pretrained drops the prefix
        hf_state = {f"{prefix}.{k}": v for k, v in hf_state.items()}
    table = _encoder_key_table(config)
    missing = sorted(k for k in table if k not in hf_state)
    if missing:
        raise KeyError(f"{path}: not a {config.num_layers}-layer RoBERTa encoder; missing {missing[:5]}")
    ours = _pad_vocab({table[k]: hf_state[k] for k in table}, config)
    model = encoder(config)
    model.load_state_dict({k.removeprefix(f"{encoder_prefix(config)}."): v for k, v in ours.items()}, strict=True)
    return model.eval()
