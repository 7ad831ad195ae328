"""roberta_pl.attention: per-document positions, the attention mask (documents x padding x window) against a
brute-force definition, and attention within documents equal to attention over each document alone."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from roberta_pl.attention import (
    attend,
    attention_bias,
    document_positions,
    prepare,
    varlen_layout,
)

# Two rows: three documents then padding; one document id reused after another (A B A: three documents).
DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [5, 5, 7, 7, 7, 7, 5, 5, 5, 5]])
PAD = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 10])


def brute_force(docs, mask, window, T):
    """The mask by its definition, one (q, k) pair at a time."""
    B = 1 if docs is None and mask is None else (docs if docs is not None else mask).shape[0]
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b, q, k in itertools.product(range(B), range(T), range(T)):
        same = docs is None or (docs[b, min(q, k):max(q, k) + 1] == docs[b, q]).all()
        real = mask is None or bool(mask[b, k])
        near = window is None or abs(q - k) <= window // 2
        out[b, 0, q, k] = bool(same and real and near)
    return out


def test_document_positions_restart_at_each_document():
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 0, 1, 2, 3]])
    assert torch.equal(document_positions(DOCS), expected)


@pytest.mark.parametrize("docs", [None, DOCS], ids=["no_docs", "docs"])
@pytest.mark.parametrize("mask", [None, PAD], ids=["no_pad", "pad"])
@pytest.mark.parametrize("window", [None, 4, 5], ids=["global", "window4", "window5"])
def test_attention_bias_is_documents_and_padding_and_window(docs, mask, window):
    T = DOCS.shape[1]
    got = attention_bias(docs, mask, window, T)
    if docs is None and mask is None and window is None:
        assert got is None
        return
    expected = brute_force(docs, mask, window, T)
    assert got.dtype == torch.bool and got.dim() == 4
    got = got.expand_as(expected)
    # Real queries see exactly their document's real keys in the window; what a padding query sees is never read,
    # but it must see something (SDPA gives NaN for an empty row).
    real = (mask if mask is not None else torch.ones(1, T)).bool()[:, None, :, None].expand_as(expected)
    assert torch.equal(got[real], expected[real])
    assert got.any(dim=-1).all()


def test_attend_within_documents_equals_each_document_alone():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 10, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    out = attend(q, k, v, document_ids=DOCS, attention_mask=PAD)
    for b in range(B):
        real = int(PAD[b].sum())
        starts = [0] + [t for t in range(1, real) if DOCS[b, t] != DOCS[b, t - 1]] + [real]
        for lo, hi in zip(starts, starts[1:]):
            alone = F.scaled_dot_product_attention(q[b:b + 1, :, lo:hi], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi])
            torch.testing.assert_close(out[b:b + 1, :, lo:hi], alone, rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()  # padding queries attend to themselves, never to an empty row


def test_unrestricted_attention_is_plain_sdpa():
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    assert prepare(None, None, None, (2, 6), device=q.device, dtype=q.dtype) is None
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_varlen_layout_cuts_at_documents_rows_and_padding():
    layout = varlen_layout(DOCS, PAD, None, (2, 10))
    # Row 0: documents of 3, 2, 3 real tokens (2 padding dropped); row 1: 2, 4, 4 (A B A is three documents).
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 8, 10, 14, 18]
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == 4
    assert layout.keep.tolist() == list(range(8)) + list(range(10, 20))
    local = varlen_layout(None, None, 128, (3, 16))  # one document per row; ModernBERT's window: 64 each side
    assert local.cu_seqlens.tolist() == [0, 16, 32, 48] and local.keep is None and local.window == (64, 64)


@pytest.mark.gpu
def test_flash_varlen_matches_sdpa_mask_on_cuda():
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 10, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    docs, pad = DOCS.cuda(), PAD.cuda()
    for window in (None, 4):
        layout = prepare(docs, pad, window, (B, T), device=q.device, dtype=q.dtype)
        assert not isinstance(layout, torch.Tensor)  # the varlen backend was picked
        flash = attend(q, k, v, layout=layout)
        sdpa = attend(q.float(), k.float(), v.float(), layout=attention_bias(docs, pad, window, T))
        real = pad.bool()[:, None, :, None]
        torch.testing.assert_close(flash.float() * real, sdpa * real, rtol=2e-2, atol=2e-2)
