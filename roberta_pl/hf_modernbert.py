"""HuggingFace interop for the ModernBERT architecture: the key table and ``config.json`` both ways.

:mod:`roberta_pl.hf` does the reading and writing for every architecture and asks here for ModernBERT's table and
config. Our names are HF's ``ModernBertForMaskedLM`` names (:mod:`roberta_pl.modernbert`), so the table is the
identity, and it is the contract that every key is accounted for. The decoder is tied to the token embeddings
(HF stores it once, ``decoder.weight`` is never written) and its bias is ``decoder.bias``.

``config.json`` is written by hand (no ``transformers`` import), with the alternation as ``layer_types`` and the
RoPE bases as ``rope_parameters`` (transformers 5) and also as the older ``global_attn_every_n_layers``,
``global_rope_theta`` and ``local_rope_theta`` keys (transformers 4.48+ read those).
"""

from __future__ import annotations

from roberta_pl.model import RobertaConfig
from roberta_pl.modernbert import is_global_layer

MODEL_TYPE = "modernbert"
# Our RoBERTa class names (what callers ask for) -> ModernBERT's.
CLASS_NAMES = {"RobertaForMaskedLM": "ModernBertForMaskedLM",
               "RobertaForSequenceClassification": "ModernBertForSequenceClassification",
               "RobertaForTokenClassification": "ModernBertForTokenClassification"}
VOCAB_SIZED = ("model.embeddings.tok_embeddings.weight", "decoder.bias")
TIED_KEY = "decoder.weight"
_LAYER_KEYS = ("attn.Wqkv.weight", "attn.Wo.weight", "mlp_norm.weight", "mlp.Wi.weight", "mlp.Wo.weight")
_HEAD_KEYS = ("head.dense.weight", "head.norm.weight", "decoder.bias")


def encoder_key_table(config: RobertaConfig) -> dict[str, str]:
    """HF key -> our key for the encoder (``model.*``): layer 0 has no ``attn_norm`` (an identity in HF too)."""
    keys = ["model.embeddings.tok_embeddings.weight", "model.embeddings.norm.weight", "model.final_norm.weight"]
    for i in range(config.num_layers):
        keys += [f"model.layers.{i}.{k}" for k in (_LAYER_KEYS if i == 0 else ("attn_norm.weight", *_LAYER_KEYS))]
    return {k: k for k in keys}


def key_table(config: RobertaConfig) -> dict[str, str]:
    """HF key -> our key for the masked LM: the encoder, the head and the decoder's bias."""
    return encoder_key_table(config) | {k: k for k in _HEAD_KEYS}


def layer_types(config: RobertaConfig) -> list[str]:
    """HF's per-layer attention kinds: ``full_attention`` every ``global_attn_every_n_layers``, else sliding."""
    return ["full_attention" if is_global_layer(config, i) else "sliding_attention" for i in range(config.num_layers)]


def config_to_hf(config: RobertaConfig, architecture: str = "RobertaForMaskedLM") -> dict:
    """Our ModernBERT config as the ``config.json`` dict of ``transformers``' ModernBERT classes.

    Args:
        config: an ``architecture="modernbert"`` config.
        architecture: our RoBERTa class name for the head (:data:`CLASS_NAMES`); its ModernBERT class is written.
    """
    return {
        "architectures": [CLASS_NAMES[architecture]],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "hidden_activation": "gelu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.initializer_range,
        "initializer_cutoff_factor": 2.0,
        "norm_eps": config.layer_norm_eps,
        "norm_bias": False,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "cls_token_id": config.bos_token_id,
        "sep_token_id": config.eos_token_id,
        "attention_bias": False,
        "attention_dropout": config.attention_dropout,
        "embedding_dropout": config.dropout,
        "mlp_bias": False,
        "mlp_dropout": config.dropout,
        "decoder_bias": True,
        "classifier_pooling": "cls",
        "classifier_dropout": config.dropout,
        "classifier_bias": False,
        "classifier_activation": "gelu",
        "local_attention": config.local_attention,
        "layer_types": layer_types(config),
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta}},
        "global_attn_every_n_layers": config.global_attn_every_n_layers,
        "global_rope_theta": config.global_rope_theta,
        "local_rope_theta": config.local_rope_theta,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# Settings of HF's ModernBERT our model has one way only: config key -> the value we build.
_FIXED = {"hidden_activation": "gelu", "norm_bias": False, "attention_bias": False, "mlp_bias": False,
          "decoder_bias": True, "classifier_bias": False, "classifier_activation": "gelu"}


def config_from_hf(hf: dict) -> RobertaConfig:
    """Read a ``transformers`` ModernBERT ``config.json`` dict; refuses, naming the key, what our model cannot be."""
    for key, value in _FIXED.items():
        if hf.get(key, value) != value:
            raise ValueError(f"config.json has {key}={hf[key]!r}; roberta-pl's ModernBERT supports only {value!r}")
    n = _global_every(hf)
    scaling = hf.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope_scaling={scaling}; roberta-pl's ModernBERT has plain RoPE only (null or "
                         f"rope_type 'default')")
    rope = hf.get("rope_parameters") or {}
    if set(rope) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"config.json: rope_parameters={rope}; ModernBERT's are per attention kind "
                         f"({{'full_attention': {{...}}, 'sliding_attention': {{...}}}})")
    theta = {}
    for kind, old_key, default in (("full_attention", "global_rope_theta", 160_000.0),
                                   ("sliding_attention", "local_rope_theta", 10_000.0)):
        params = rope.get(kind) or {}
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_parameters.{kind}.rope_type={params['rope_type']!r}; only "
                             f"'default' RoPE is supported")
        theta[kind] = float(params.get("rope_theta", hf.get(old_key, default)))
    dropout = hf.get("mlp_dropout", 0.0)
    return RobertaConfig(
        architecture="modernbert",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 8192),
        dropout=dropout,
        attention_dropout=hf.get("attention_dropout", 0.0),
        layer_norm_eps=hf.get("norm_eps", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id", 50283),
        bos_token_id=hf.get("cls_token_id", hf.get("bos_token_id", 50281)),
        eos_token_id=hf.get("sep_token_id", hf.get("eos_token_id", 50282)),
        local_attention=hf.get("local_attention", 128),
        global_attn_every_n_layers=n,
        global_rope_theta=theta["full_attention"],
        local_rope_theta=theta["sliding_attention"],
    )


def _global_every(hf: dict) -> int:
    """``global_attn_every_n_layers`` from ``layer_types`` (transformers 5) or the older key itself."""
    n = int(hf.get("global_attn_every_n_layers", 3))
    kinds = hf.get("layer_types")
    if kinds is None:
        return n
    if len(kinds) != hf["num_hidden_layers"]:
        raise ValueError(f"config.json: layer_types has {len(kinds)} entries but num_hidden_layers="
                         f"{hf['num_hidden_layers']}; one per layer")
    globals_ = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    n = globals_[1] if len(globals_) > 1 else len(kinds) + 1 if globals_ == [0] else 0
    expected = ["full_attention" if n and i % n == 0 else "sliding_attention" for i in range(len(kinds))]
    if not n or kinds != expected:
        raise ValueError(f"config.json: layer_types {kinds} is not global attention every n layers from layer 0; "
                         f"roberta-pl's ModernBERT alternates that way only")
    return n
