"""RoBERTa encoder and masked-LM model in plain PyTorch (no Lightning, no data imports).

The architecture is RoBERTa's (Liu et al., 2019), itself BERT's with a fairseq flavour:
post-LayerNorm blocks (eps 1e-5), erf-GELU, dropout 0.1 on hidden states and attention probabilities,
learned absolute positions with the fairseq padding offset (real tokens start at ``pad_token_id + 1``,
so the table has ``max_seq_len + 2`` rows) and a single token type.

``pre_layernorm=True`` moves each block's LayerNorms in front of its attention and feed-forward (inside the
residual branch) and adds one LayerNorm after the last layer, the embeddings' LayerNorm staying: exactly
``transformers``' ``RobertaPreLayerNormForMaskedLM`` (model type ``roberta-prelayernorm``). Pre-LN keeps the
residual stream's gradients well scaled at depth, so it tolerates a much higher peak LR (Xiong et al., 2020;
Geiping & Goldstein, 2022, "Cramming"). Our names stay ``roberta.*``; :mod:`roberta_pl.hf` maps them to HF's
``roberta_prelayernorm.*``.

Parameter names mirror HuggingFace's ``RobertaForMaskedLM`` (``roberta.encoder.layer.{i}.attention.self.query``,
``lm_head.dense`` ...), so conversion in :mod:`roberta_pl.hf` is a table, not code.

Attention goes through :mod:`roberta_pl.attention`: SDPA, unmasked for FULL-SENTENCES blocks, with a key mask for padding;
``document_ids`` (``packed_docs``) restart positions at each document and keep attention within it (flash varlen on CUDA).

Arithmetic for ``base`` (12 layers, 768 hidden, 50265 vocab): embeddings 50265*768 + 514*768 ≈ 39.0M,
each layer 12*768^2 + 13*768 ≈ 7.1M, so 12 layers ≈ 85.1M; the MLM head adds 768^2 + vocab bias ≈ 0.6M
(the decoder is tied to the word embeddings): ≈ 124.7M in all, RoBERTa's "125M".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_pipelines.contract import IGNORE_INDEX
from roberta_pl.attention import attend, document_positions, prepare
from roberta_pl.dropout import Dropout
from roberta_pl.flops import mlm_flops_per_token, mlm_head_flops  # noqa: F401 - the model's FLOPs, asked for here
from roberta_pl.mlm_head import mlm_loss

# transformers model types with exactly this post-LN architecture (their heads differ only in class name).
POST_LN_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")


ARCHITECTURES = ("roberta", "modernbert")


@dataclass
class RobertaConfig:
    """Shape and regularisation of a RoBERTa encoder.

    ``vocab_size`` is the tokenizer's real vocabulary; ``pad_vocab_multiple`` rounds the embedding
    table up (e.g. to 64) for faster matmuls, and the padded rows never reach a loss or an export.
    """

    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_seq_len: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_vocab_multiple: int = 1
    activation_checkpointing: bool = False
    pre_layernorm: bool = False  # LayerNorm before attention/FFN plus a final one (HF's roberta-prelayernorm)
    # The transformers model type an export writes, kept from a loaded model (``xlm-roberta``, ``camembert``: RoBERTa's
    # architecture under another name). None: ``roberta``, or ``roberta-prelayernorm`` with pre_layernorm.
    hf_model_type: str | None = None
    # "roberta" (the classes below) or "modernbert" (roberta_pl.modernbert, HF's ModernBertForMaskedLM). The fields
    # after it are ModernBERT's alone; it reads dropout as its embedding/MLP dropout, layer_norm_eps as norm_eps.
    architecture: str = "roberta"
    local_attention: int = 128  # the local layers' window in tokens: local_attention // 2 on each side
    global_attn_every_n_layers: int = 3  # layer i is global when i % n == 0 (ModernBERT: 0, 3, 6 ...)
    global_rope_theta: float = 160_000.0  # RoPE base of the global layers (ModernBERT's 8k phase)
    local_rope_theta: float = 10_000.0  # RoPE base of the local layers

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.vocab_size <= max(self.pad_token_id, self.bos_token_id, self.eos_token_id):
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the special token ids")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "modernbert":
            _check_modernbert(self)
            return
        named = ("roberta-prelayernorm",) if self.pre_layernorm else POST_LN_MODEL_TYPES
        if self.hf_model_type is not None and self.hf_model_type not in named:
            raise ValueError(f"hf_model_type={self.hf_model_type!r} with pre_layernorm={self.pre_layernorm}; "
                             f"choose one of {', '.join(named)} (or None)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_positions(self) -> int:
        """Rows of the position table: fairseq offsets positions by pad_token_id + 1."""
        return self.max_seq_len + self.pad_token_id + 1

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return math.ceil(self.vocab_size / m) * m

    @classmethod
    def from_name(cls, name: str, **overrides) -> "RobertaConfig":
        """A named preset (``tiny``, ``small``, ``base``, ``large``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_modernbert(config: RobertaConfig) -> None:  # one line naming the field out of range
    if config.pre_layernorm or config.hf_model_type not in (None, "modernbert"):
        raise ValueError("architecture=modernbert is pre-norm by construction; leave pre_layernorm=false and "
                         f"hf_model_type unset (got {config.pre_layernorm}, {config.hf_model_type!r})")
    if config.local_attention < 2:
        raise ValueError(f"local_attention={config.local_attention}: a window of at least 2 tokens (// 2 each side)")
    if config.global_attn_every_n_layers < 1:
        raise ValueError(f"global_attn_every_n_layers={config.global_attn_every_n_layers}: at least 1")
    for name in ("global_rope_theta", "local_rope_theta"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name}={getattr(config, name)}: a RoPE base is positive")
    if config.head_dim % 2:
        raise ValueError(f"hidden_size/num_heads={config.head_dim}: RoPE needs an even head dimension")


# ModernBERT's shapes (Warner et al., 2024, Table 3; answerdotai/ModernBERT-*): no dropout, 8,192 tokens, 50,368 ids
# (a run's vocabulary and special ids come from its tokenizer; the rows are padded to a multiple of 64).
_MODERNBERT = dict(architecture="modernbert", dropout=0.0, attention_dropout=0.0, vocab_size=50368,
                   max_seq_len=8192, pad_vocab_multiple=64)

PRESETS: dict[str, RobertaConfig] = {
    "tiny": RobertaConfig(
        vocab_size=8192, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512, max_seq_len=128
    ),
    "small": RobertaConfig(
        vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048, max_seq_len=512
    ),
    "base": RobertaConfig(pad_vocab_multiple=64),
    "large": RobertaConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, pad_vocab_multiple=64),
    "modernbert_tiny": RobertaConfig(**{**_MODERNBERT, "vocab_size": 8192, "max_seq_len": 1024}, hidden_size=128,
                                     num_layers=3, num_heads=2, intermediate_size=256, local_attention=32),
    "modernbert_base": RobertaConfig(**_MODERNBERT, hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152),
    "modernbert_large": RobertaConfig(**_MODERNBERT, hidden_size=1024, num_layers=28, num_heads=16, intermediate_size=2624),
}
# Where each preset's shape comes from; conf/model/<name>.yaml is generated from PRESETS and these lines
# (roberta_pl.config.preset_yaml), with the parameter count computed, never typed.
PRESET_SOURCES: dict[str, str] = {
    "tiny": "For tests and the CPU quickstart",
    "small": 'BERT-small\'s shape (Turc et al., 2019, "Well-Read Students Learn Better")',
    "base": "RoBERTa-base (Liu et al., 2019, Table 9; BERT-base shape)",
    "large": "RoBERTa-large (Liu et al., 2019, Table 9; BERT-large shape)",
    "modernbert_tiny": "ModernBERT-class, for tests and a CPU quickstart (3 layers: global, local, local; window 32)",
    "modernbert_base": "ModernBERT-base (Warner et al., 2024, Table 3; answerdotai/ModernBERT-base)",
    "modernbert_large": "ModernBERT-large (Warner et al., 2024, Table 3; answerdotai/ModernBERT-large)",
}


class MaskedLMOutput(NamedTuple):
    """``loss`` is None without labels. With labels, ``logits`` covers only the predicted positions
    (shape ``[num_predicted, vocab]``, in row-major order of the label mask) and ``targets`` holds their
    labels (``[num_predicted]``); without, ``logits`` is ``[B, T, vocab]`` and ``targets`` is None."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    targets: torch.Tensor | None = None


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's init, for ``module.apply``: N(0, std) for matrices, zero biases, unit LayerNorm, zero padding rows."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class RobertaEmbeddings(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(1, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        # fairseq's make_positions: real tokens count up from pad_id + 1 (in each document), padding stays at pad_id.
        not_pad = input_ids.ne(self.pad_token_id).int()
        counts = torch.cumsum(not_pad, dim=1) if document_ids is None else document_positions(document_ids) + 1
        position_ids = counts * not_pad + self.pad_token_id
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids.long())
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class RobertaSelfAttention(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_dropout

    def forward(self, x: torch.Tensor, attn_mask) -> torch.Tensor:  # attn_mask: roberta_pl.attention.prepare's layout
        B, T, C = x.shape
        # One [C, 3C] GEMM instead of three [C, C] ones; the three Linears stay separate parameters (HF names).
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        q, k, v = F.linear(x, w, b).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = attend(q, k, v, layout=attn_mask, dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)


def _pre_norm(config: RobertaConfig) -> nn.LayerNorm | None:
    """The LayerNorm a pre-LN block applies to its input; None for post-LN, whose norm follows the residual."""
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm else None


class RobertaSelfOutput(nn.Module):
    """Projection + dropout + residual (+ post-LayerNorm unless pre-LN); HF names it ``attention.output``."""

    def __init__(self, config: RobertaConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = None if config.pre_layernorm else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.dense(h)) + residual
        return x if self.LayerNorm is None else self.LayerNorm(x)


class RobertaAttention(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.self = RobertaSelfAttention(config)
        self.output = RobertaSelfOutput(config, config.hidden_size)
        self.LayerNorm = _pre_norm(config)  # HF pre-LN: attention.LayerNorm

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        h = x if self.LayerNorm is None else self.LayerNorm(x)
        return self.output(self.self(h, attn_mask), x)


class RobertaIntermediate(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.LayerNorm = _pre_norm(config)  # HF pre-LN: intermediate.LayerNorm
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.LayerNorm is None else self.LayerNorm(x)
        return F.gelu(self.dense(h))  # erf GELU, as BERT/RoBERTa (not the tanh approximation)


class RobertaLayer(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.attention = RobertaAttention(config)
        self.intermediate = RobertaIntermediate(config)
        self.output = RobertaSelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, attn_mask)
        return self.output(self.intermediate(x), x)


class RobertaEncoder(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.layer = nn.ModuleList(RobertaLayer(config) for _ in range(config.num_layers))
        self.activation_checkpointing = config.activation_checkpointing

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x


class RobertaModel(nn.Module):
    """The bare encoder: token ids ``[B, T]`` → hidden states ``[B, T, H]``."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.embeddings = RobertaEmbeddings(config)
        self.encoder = RobertaEncoder(config)
        # Pre-LN's residual stream is never normalised inside the blocks; HF's final ``LayerNorm`` does it once.
        self.LayerNorm = _pre_norm(config)

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` in place, region by region: the embeddings and each encoder layer.

        Every layer runs the same code, so dynamo traces one layer graph and reuses it for all of them
        (parameters are graph inputs): compile time stays flat with depth (small preset, 8 layers, CPU:
        11 s instead of 39 s for the whole module) at the same step time. Arguments go to ``torch.compile``;
        parameter names, and so checkpoints and exports, are unchanged.
        """
        self.embeddings.compile(*args, **kwargs)
        for layer in self.encoder.layer:
            layer.compile(*args, **kwargs)

    def forward(self, input_ids, attention_mask=None, document_ids=None) -> torch.Tensor:
        """Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding; None when nothing is padded
                (packed blocks), which lets SDPA pick the flash kernel.
            document_ids: ``[B, T]``, runs of equal ids are documents (``packed_docs`` batches), or None.
        Returns:
            hidden states ``[B, T, H]``.
        """
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        attn_mask = prepare(document_ids, attention_mask, None, input_ids.shape, device=input_ids.device,
                            dtype=self.embeddings.word_embeddings.weight.dtype)  # once for all layers
        h = self.encoder(self.embeddings(input_ids, document_ids), attn_mask)
        return h if self.LayerNorm is None else self.LayerNorm(h)


class RobertaLMHead(nn.Module):
    """dense → GELU → LayerNorm → decoder (tied to the word embeddings) + bias.

    Returns logits over the *padded* vocabulary: with ``pad_vocab_multiple`` the matmul keeps its aligned
    width (50265 → 50304 for base, so bf16 GEMMs get 16-byte-aligned rows) and the padded columns get -inf
    through a non-persistent buffer, so softmax gives them zero probability and zero gradient, and the
    state dict is unchanged. Callers slice ``[..., :vocab_size]`` (a view) before handing logits out.
    """

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))
        pad_mask = torch.zeros(config.padded_vocab_size)
        pad_mask[config.vocab_size:] = float("-inf")
        self.register_buffer("pad_mask", pad_mask if config.padded_vocab_size > config.vocab_size else None,
                             persistent=False)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits; with ``targets`` (``h`` the predicted positions only), ``(loss, logits)`` by :func:`mlm_loss`."""
        bias = self.bias if self.pad_mask is None else self.bias + self.pad_mask
        x = self.layer_norm(F.gelu(self.dense(h)))  # the bias rides in the GEMM (addmm), not a pass over the logits
        return F.linear(x, self.decoder.weight, bias) if targets is None else mlm_loss(x, self.decoder.weight, bias, targets)


class RobertaForMaskedLM(nn.Module):
    """Encoder + MLM head with sparse prediction.

    With ``labels``, the head runs only where ``labels != -100`` (fairseq, NVIDIA BERT and Cramming do the
    same): at base size with 15% masking this skips ~85% of the vocab projection, about a quarter of the
    model's FLOPs. Without labels it returns full logits.
    """

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config)
        self.lm_head = RobertaLMHead(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        # Tied after init: initialising the decoder (an nn.Linear) would redraw the shared table, <pad> row included.
        self.lm_head.decoder.weight = self.roberta.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> MaskedLMOutput:
        """Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]`` 1/0 padding mask, or None for unpadded (packed) batches.
            labels: ``[B, T]`` target ids, -100 where nothing is predicted. Optional.
            document_ids: ``[B, T]`` (``packed_docs``; see :class:`RobertaModel`), or None.
        Returns:
            :class:`MaskedLMOutput`; with labels the loss is the mean cross-entropy over predicted positions.
        """
        V = self.config.vocab_size
        h = self.roberta(input_ids, attention_mask, document_ids)
        if labels is None:
            return MaskedLMOutput(None, self.lm_head(h)[..., :V])
        # Sparse: one nonzero (one GPU host sync) serves both gathers, row-major as boolean indexing would give.
        where = labels.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
        targets = labels.reshape(-1).index_select(0, where)
        loss, logits = self.lm_head(h.reshape(-1, h.shape[-1]).index_select(0, where), targets)
        return MaskedLMOutput(loss, logits[:, :V], targets)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.roberta.embeddings.word_embeddings.weight.numel()
            n -= self.roberta.embeddings.position_embeddings.weight.numel()
        return n


class RobertaClassificationHead(nn.Module):
    """HF's sentence head on the ``<s>`` state: dropout → dense → tanh → dropout → out_proj."""

    def __init__(self, config: RobertaConfig, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.dropout)
        self.out_proj = nn.Linear(config.hidden_size, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.dropout(h[:, 0])
        return self.out_proj(self.dropout(torch.tanh(self.dense(x))))


class RobertaForSequenceClassification(nn.Module):
    """Encoder + sentence head: ``[B, T]`` ids → ``[B, num_labels]`` logits (``num_labels=1``: a regression score).

    Names match ``transformers.RobertaForSequenceClassification`` (``roberta.*``, ``classifier.dense``,
    ``classifier.out_proj``).
    """

    def __init__(self, config: RobertaConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.roberta = RobertaModel(config)
        self.classifier = RobertaClassificationHead(config, num_labels)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, attention_mask=None, document_ids=None) -> torch.Tensor:
        return self.classifier(self.roberta(input_ids, attention_mask, document_ids))


class RobertaForTokenClassification(nn.Module):
    """Encoder + per-token linear head: ``[B, T]`` ids → ``[B, T, num_labels]`` logits.

    Names match ``transformers.RobertaForTokenClassification`` (``roberta.*``, ``classifier``).
    """

    def __init__(self, config: RobertaConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.roberta = RobertaModel(config)
        self.dropout = Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, attention_mask=None, document_ids=None) -> torch.Tensor:
        return self.classifier(self.dropout(self.roberta(input_ids, attention_mask, document_ids)))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Sentence vectors from hidden states ``[B, T, H]``: ``mean`` over real tokens or the ``cls`` (``<s>``) state."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling={pooling!r}; choose mean or cls")
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
