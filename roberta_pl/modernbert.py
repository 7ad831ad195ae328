"""A ModernBERT-class encoder and its heads in plain PyTorch: ``transformers``' ``ModernBertForMaskedLM``, exactly.

The architecture is ModernBERT's (Warner et al., 2024): token embeddings and a LayerNorm (no position table),
pre-norm blocks without biases (the first block's attention takes the embeddings' norm as its own), RoPE on queries
and keys, a GeGLU feed-forward (``Wi`` gives input and gate, ``gelu(input) * gate``, ``Wo``), alternating global and
local attention (layer ``i`` is global when ``i % global_attn_every_n_layers == 0``; local layers see
``local_attention // 2`` tokens either side, with a smaller RoPE base), a final norm, and a head of dense → GELU →
norm before the decoder, which is tied to the embeddings and has a bias.

Parameter names mirror HF's (``model.layers.{i}.attn.Wqkv``, ``head.dense``, ``decoder.bias`` ...), so
:mod:`roberta_pl.hf_modernbert` is a key table. The configuration is :class:`~roberta_pl.model.RobertaConfig` with
``architecture="modernbert"``; the forward contracts are the RoBERTa classes', so every job takes either.

All attention goes through :func:`roberta_pl.attention.attend`: with ``document_ids`` (documents packed into one
row) a token attends only within its document, and RoPE positions restart at each document, so a packed row gives
each document's logits as if it ran alone.

Arithmetic for ``modernbert_base`` (22 layers, 768 hidden, 1152 GeGLU width, 50368 vocab): embeddings
50368*768 ≈ 38.7M; each layer 3*768^2 (Wqkv) + 768^2 (Wo) + 768*2304 (Wi) + 1152*768 (Wo) + 2*768 (norms)
≈ 5.3M, so 22 layers ≈ 116.8M; final norm, head dense + norm and decoder bias ≈ 0.6M: ≈ 149M, ModernBERT-base's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_pipelines.contract import IGNORE_INDEX
from roberta_pl.attention import attend, document_positions, prepare
from roberta_pl.dropout import Dropout
from roberta_pl.mlm_head import mlm_loss
from roberta_pl.model import MaskedLMOutput, RobertaConfig


def is_global_layer(config: RobertaConfig, i: int) -> bool:
    """Whether layer ``i`` attends globally (HF's ``full_attention``) rather than within the local window."""
    return i % config.global_attn_every_n_layers == 0


def init_modernbert(module: nn.Module, config: RobertaConfig) -> None:
    """HF's ModernBERT init: truncated normals cut at 2 std; projections into the residual stream (and the head's
    dense) at std / sqrt(2 * layers), a classifier at hidden_size^-0.5; unit norms, zero biases, a zero padding row."""
    std = config.initializer_range
    out_std = std / math.sqrt(2.0 * config.num_layers)

    def trunc(w: torch.Tensor, s: float) -> None:
        nn.init.trunc_normal_(w, std=s, a=-2 * s, b=2 * s)

    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            s = out_std if name.endswith(("Wo", "head.dense")) else std
            trunc(m.weight, config.hidden_size ** -0.5 if name == "classifier" else s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            trunc(m.weight, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size,
                                           padding_idx=config.pad_token_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        self.drop = Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class ModernBertMLP(nn.Module):
    """GeGLU: one ``[H, 2F]`` matmul gives input and gate, ``Wo(gelu(input) * gate)``."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.drop = Dropout(config.dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(F.gelu(h) * gate))


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[B or 1, 1, T, head_dim]`` for integer ``positions`` ``[B or 1, T]`` (computed in fp32)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-rotation layout, in fp32 whatever ``x``'s dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class ModernBertAttention(nn.Module):
    def __init__(self, config: RobertaConfig, layer: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.window = None if is_global_layer(config, layer) else config.local_attention
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.dropout_p = config.attention_dropout
        self.out_drop = Dropout(config.attention_dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attend(q, k, v, layout=layout, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_drop(self.Wo(y.transpose(1, 2).reshape(B, T, C)))


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config: RobertaConfig, layer: int):
        super().__init__()
        # The first block's input is the embeddings' norm already: HF gives it an identity here.
        self.attn_norm = nn.Identity() if layer == 0 else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                                                       bias=False)
        self.attn = ModernBertAttention(config, layer)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        self.mlp = ModernBertMLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout) -> torch.Tensor:
        """``rope``: :func:`rope_tables` for this layer's kind; ``layout``: what :func:`roberta_pl.attention.prepare`
        gave for this layer's window (shared by all layers of its kind)."""
        x = x + self.attn(self.attn_norm(x), rope, layout)
        return x + self.mlp(self.mlp_norm(x))


def _inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


class ModernBertModel(nn.Module):
    """The bare encoder: token ids ``[B, T]`` → hidden states ``[B, T, H]`` (after the final norm)."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        # Derived from the config, never saved: a checkpoint continued with a larger RoPE base takes the new one.
        self.register_buffer("global_inv_freq", _inv_freq(config.global_rope_theta, config.head_dim), persistent=False)
        self.register_buffer("local_inv_freq", _inv_freq(config.local_rope_theta, config.head_dim), persistent=False)
        self.activation_checkpointing = config.activation_checkpointing

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` in place, region by region (as :meth:`roberta_pl.model.RobertaModel.compile`)."""
        self.embeddings.compile(*args, **kwargs)
        for layer in self.layers:
            layer.compile(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding; None when nothing is padded.
            document_ids: ``[B, T]`` ids of the document each token belongs to, for rows that pack several; a
                token attends only within its document and RoPE positions restart at each. None: one per row.
        Returns:
            hidden states ``[B, T, H]``.
        """
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embeddings(input_ids)
        positions = (document_positions(document_ids) if document_ids is not None
                     else torch.arange(T, device=input_ids.device)[None])
        # Once per forward for each kind of layer (global, local): RoPE tables and the attention mask or varlen offsets.
        kinds = {}
        for window, inv_freq in ((None, self.global_inv_freq), (self.config.local_attention, self.local_inv_freq)):
            kinds[window] = (rope_tables(inv_freq, positions, x.dtype),
                             prepare(document_ids, attention_mask, window, tuple(input_ids.shape), device=x.device,
                                     dtype=x.dtype))
        for layer in self.layers:
            rope, layout = kinds[layer.attn.window]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, rope, layout, use_reentrant=False)
            else:
                x = layer(x, rope, layout)
        return self.final_norm(x)


class ModernBertPredictionHead(nn.Module):
    """dense → GELU → norm (no biases): before the decoder, and before the classifiers."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))


class ModernBertForMaskedLM(nn.Module):
    """Encoder + head + tied decoder with a bias, with sparse prediction: the contract of
    :class:`roberta_pl.model.RobertaForMaskedLM` (with labels only the masked positions reach the decoder; padded
    vocabulary columns get -inf and are sliced off)."""

    base_model_prefix = "model"

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.padded_vocab_size)
        pad_mask = torch.zeros(config.padded_vocab_size)
        pad_mask[config.vocab_size:] = float("-inf")
        self.register_buffer("pad_mask", pad_mask if config.padded_vocab_size > config.vocab_size else None,
                             persistent=False)
        init_modernbert(self, config)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def _logits(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits; with ``targets`` (``h`` the predicted positions only), ``(loss, logits)`` by :func:`mlm_loss`."""
        bias = self.decoder.bias if self.pad_mask is None else self.decoder.bias + self.pad_mask
        x = self.head(h)
        return F.linear(x, self.decoder.weight, bias) if targets is None else mlm_loss(x, self.decoder.weight, bias, targets)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> MaskedLMOutput:
        """As :meth:`roberta_pl.model.RobertaForMaskedLM.forward`; ``document_ids`` as :class:`ModernBertModel`."""
        V = self.config.vocab_size
        h = self.model(input_ids, attention_mask, document_ids)
        if labels is None:
            return MaskedLMOutput(None, self._logits(h)[..., :V])
        where = labels.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
        targets = labels.reshape(-1).index_select(0, where)
        loss, logits = self._logits(h.reshape(-1, h.shape[-1]).index_select(0, where), targets)
        return MaskedLMOutput(loss, logits[:, :V], targets)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embeddings.tok_embeddings.weight.numel() if exclude_embeddings else n


class ModernBertForSequenceClassification(nn.Module):
    """Encoder + head on the first (``[CLS]``) state + dropout + classifier: HF's class with ``classifier_pooling``
    ``cls``. ``[B, T]`` ids → ``[B, num_labels]`` logits."""

    base_model_prefix = "model"

    def __init__(self, config: RobertaConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.drop = Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_modernbert(self, config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.drop(self.head(self.model(input_ids, attention_mask)[:, 0])))


class ModernBertForTokenClassification(ModernBertForSequenceClassification):
    """The same modules (and state dict) on every token: ``[B, T]`` ids → ``[B, T, num_labels]`` logits."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.drop(self.head(self.model(input_ids, attention_mask))))
