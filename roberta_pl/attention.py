"""Attention restricted to documents, padding and a local window, for both encoder architectures.

A packed batch (``data.packing=packed_docs``) holds several documents per row, each its own ``<s> … </s>``,
with ``document_ids`` ``[B, T]`` saying which (a document is a run of equal ids). Attention must then stay
within each document: the per-document logits equal those of the document run alone (tests/helpers/packed_docs.py).

Two backends, picked once per forward by :func:`prepare`:

* **FlashAttention varlen** (CUDA, ``flash_attn`` importable, fp16/bf16 activations): the rows are flattened to one
  stream of real tokens cut at ``cu_seqlens`` (document starts, row starts, padding dropped), so no FLOP goes to
  padding or across documents; a local window is flash's ``window_size``.
* **SDPA with a boolean mask** (everywhere else): :func:`torch.nn.functional.scaled_dot_product_attention` with the
  ``[B, 1, T, T]`` mask of :func:`attention_bias`. On CPU it was the fastest exact choice measured (see
  bench/README.md, "Packing modes"): ``flex_attention`` needs ``torch.compile`` there, and nested tensors have no
  fused CPU kernel for a mask-free jagged batch with dropout.

Imports torch and roberta_pl.dropout, nothing else of the project (the model may import it:
tests/unit/test_import_rules.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from roberta_pl.dropout import dropout


def document_positions(document_ids: Tensor) -> Tensor:
    """Position of each token within its document, restarting at 0 at each document start.

    Args:
        document_ids: ``[B, T]`` integers; a document is a run of equal ids (a row start starts one too).

    Returns:
        ``[B, T]`` int64: 0 at each document's first token, counting up by one within it.
    """
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = _starts(document_ids)
    # The index of the last document start at or before each token (cummax carries it forward).
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def _starts(document_ids: Tensor) -> Tensor:
    """``[B, T]`` bool: True where a document starts (position 0 of a row, or a change of id)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def attention_bias(document_ids: Tensor | None, attention_mask: Tensor | None, window: int | None,
                   T: int) -> Tensor | None:
    """The boolean attention mask: True where query ``q`` may attend to key ``k``.

    ``q`` may attend to ``k`` when both are in the same document, ``k`` is not padding, and (with ``window``)
    ``|q - k| <= window // 2`` (ModernBERT's local attention: ``window=128`` sees 64 tokens each side, as
    ``transformers``' ModernBERT does). A padding query also attends to itself, so that no row is empty
    (SDPA would return NaN there); real tokens always attend to themselves, so nothing else changes.

    Args:
        document_ids: ``[B, T]`` (runs of equal ids are documents) or None (one document per row).
        attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding, or None (nothing padded).
        window: the local window's width in tokens, or None (global attention).
        T: the sequence length.

    Returns:
        bool ``[B, 1, T, T]`` (``[1, 1, T, T]`` with only a window; a broadcast view of ``[B, 1, 1, T]`` with only
        padding), or None when nothing restricts attention.
    """
    mask = None
    if document_ids is not None:
        runs = _starts(document_ids).cumsum(dim=1)  # equal ids apart (A B A) are different documents
        mask = (runs[:, :, None] == runs[:, None, :])[:, None]
    if window is not None:
        index = torch.arange(T, device=_device(document_ids, attention_mask))
        band = ((index[:, None] - index[None, :]).abs() <= window // 2)[None, None]
        mask = band if mask is None else mask & band
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :]
        if mask is None:
            return keys.expand(-1, 1, T, T)
        eye = torch.eye(T, dtype=torch.bool, device=keys.device)
        mask = (mask & keys) | eye
    return mask


def _device(*tensors: Tensor | None) -> torch.device | None:
    return next((t.device for t in tensors if t is not None), None)


class VarlenLayout(NamedTuple):
    """What FlashAttention's varlen kernel needs, computed once per forward by :func:`varlen_layout`.

    Attributes:
        cu_seqlens: int32 ``[documents + 1]``, the offsets of the documents in the flattened stream of kept tokens.
        max_seqlen: the longest document.
        keep: int64 indices of the kept (non-padding) tokens in the flattened ``B * T`` rows; None when all are kept.
        window: flash's ``window_size`` (``(-1, -1)``: global).
        shape: ``(B, T)``.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    keep: Tensor | None
    window: tuple[int, int]
    shape: tuple[int, int]


def varlen_layout(document_ids: Tensor | None, attention_mask: Tensor | None, window: int | None,
                  shape: tuple[int, int], device: torch.device | None = None) -> VarlenLayout:
    """Document offsets in the flattened batch: every row start and every change of id starts a document;
    padding (``attention_mask == 0``) is dropped. One host sync (the longest document)."""
    B, T = shape
    device = _device(document_ids, attention_mask) or device
    starts = _starts(document_ids) if document_ids is not None else torch.zeros(B, T, dtype=torch.bool, device=device)
    starts[:, 0] = True
    keep = None
    if attention_mask is not None:
        real = attention_mask.bool().reshape(-1)
        keep = real.nonzero().squeeze(1)
        starts = starts.reshape(-1)[keep]
    lengths = torch.diff(torch.nonzero(starts.reshape(-1)).squeeze(1),
                         append=torch.tensor([starts.numel()], device=starts.device))
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    half = -1 if window is None else window // 2
    return VarlenLayout(cu_seqlens, int(lengths.max()), keep, (half, half), (B, T))


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _activation_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def prepare(document_ids: Tensor | None, attention_mask: Tensor | None, window: int | None,
            shape: tuple[int, int], *, device: torch.device, dtype: torch.dtype) -> Tensor | VarlenLayout | None:
    """Pick the backend once per forward and build what it needs (the mask, or the varlen offsets).

    Args:
        document_ids, attention_mask, window: as in :func:`attention_bias`.
        shape: ``(B, T)``.
        device: where attention runs.
        dtype: the parameters' dtype (autocast's, when on, is what the kernel sees).

    Returns:
        A :class:`VarlenLayout` for FlashAttention varlen (CUDA, ``flash_attn`` installed, fp16/bf16), else the
        boolean mask of :func:`attention_bias`. With neither documents nor a window: a ``[B, 1, 1, T]`` key mask of
        the padding, or None. Pass it to :func:`attend` as ``layout``.
    """
    if document_ids is None and window is None:
        # Padding alone: SDPA with a [B, 1, 1, T] key mask, the path the RoBERTa model always had (None: no mask).
        return None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    if device.type == "cuda" and _flash_varlen() is not None and _activation_dtype(device, dtype) in (torch.float16,
                                                                                                      torch.bfloat16):
        return varlen_layout(document_ids, attention_mask, window, shape, device)
    mask = attention_bias(document_ids, attention_mask, window, shape[1])
    return mask.to(device)


_UNSET = object()


def attend(q: Tensor, k: Tensor, v: Tensor, *, document_ids: Tensor | None = None, attention_mask: Tensor | None = None,
           window: int | None = None, dropout_p: float = 0.0, layout=_UNSET) -> Tensor:
    """Bidirectional attention within documents (and padding, and a window).

    Args:
        q, k, v: ``[B, H, T, D]``.
        document_ids, attention_mask, window: as in :func:`attention_bias`; ignored when ``layout`` is given.
        dropout_p: attention dropout (pass 0.0 in eval).
        layout: what :func:`prepare` returned for this batch (a mask Tensor, a :class:`VarlenLayout`, or None),
            computed once per forward and shared by the layers; unset: computed here.

    Returns:
        ``[B, H, T, D]``; padding positions hold what the mask gives them (zeros under varlen), never read.
    """
    if layout is _UNSET:
        layout = prepare(document_ids, attention_mask, window, (q.shape[0], q.shape[2]), device=q.device, dtype=q.dtype)
    if isinstance(layout, VarlenLayout):
        return _attend_varlen(q, k, v, layout, dropout_p)
    if (dropout_p > 0.0 and layout is None and q.device.type == "cpu" and q.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")):
        # SDPA has no CPU kernel with dropout and falls back to this math (with a NaN-safe softmax, needless without
        # a mask, and torch's dearer dropout mask: roberta_pl/dropout.py). fp32 only: SDPA's fallback upcasts bf16.
        return dropout(torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).softmax(-1), dropout_p) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout, dropout_p=dropout_p)


def _attend_varlen(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, dropout_p: float) -> Tensor:
    B, H, T, D = q.shape

    def flat(x: Tensor) -> Tensor:
        x = x.transpose(1, 2).reshape(B * T, H, D)
        return x if layout.keep is None else x.index_select(0, layout.keep)

    out = _flash_varlen()(flat(q), flat(k), flat(v), layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                          layout.max_seqlen, dropout_p=dropout_p, causal=False, window_size=layout.window)
    if layout.keep is not None:
        out = out.new_zeros(B * T, H, D).index_copy(0, layout.keep, out)
    return out.view(B, T, H, D).transpose(1, 2)
