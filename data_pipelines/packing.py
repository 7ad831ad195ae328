"""Cut a stream of tokenized documents into fixed-length training blocks.

Two modes, named after the RoBERTa paper's input formats (§4.2):

* ``full`` — FULL-SENTENCES: documents are concatenated with a ``</s>`` after each one, and the
  stream is cut into blocks of exactly ``seq_len`` tokens framed as ``<s> …seq_len-2 tokens… </s>``.
  Blocks cross document boundaries and long documents are cut, so there is no padding at all.
  Concatenating the block bodies gives back the stream exactly (the test checks this).
* ``doc`` — DOC-SENTENCES: a block never crosses a document; each document is cut into bodies of
  at most ``seq_len - 2`` tokens, framed the same way and right-padded with ``<pad>``.

Both are plain generators over numpy arrays; they hold at most one document plus one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np

PackMode = Literal["full_sentences", "doc"]
BLOCK_DTYPE = np.int32  # blocks stay compact until the batch is built


def _frame(body: np.ndarray, seq_len: int, bos: int, eos: int, pad: int) -> np.ndarray:
    block = np.full(seq_len, pad, dtype=BLOCK_DTYPE)
    block[0] = bos
    block[1 : 1 + len(body)] = body
    block[1 + len(body)] = eos
    return block


def pack_full_sentences(
    docs: Iterable[np.ndarray], seq_len: int, *, bos: int = 0, eos: int = 2
) -> Iterator[np.ndarray]:
    """FULL-SENTENCES packing: ``<s>`` + ``seq_len - 2`` stream tokens + ``</s>``, no padding.

    Args:
        docs: token id arrays, one per document (no specials). A ``</s>`` separator follows each.
        seq_len: block length including ``<s>`` and ``</s>`` (>= 3).
        bos: id of ``<s>``.
        eos: id of ``</s>``, also the document separator.

    Returns:
        An iterator of int32 arrays of length ``seq_len``. The final partial body is dropped.
    """
    body = seq_len - 2
    if body < 1:
        raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    sep = np.array([eos], dtype=BLOCK_DTYPE)
    parts: list[np.ndarray] = []
    held = 0
    for doc in docs:
        parts.append(doc)
        parts.append(sep)
        held += len(doc) + 1
        if held < body:
            continue
        # One concatenate per *document* (not per block) keeps this at numpy speed even for
        # short documents; a long document yields many blocks from one concatenate.
        stream = np.concatenate(parts).astype(BLOCK_DTYPE, copy=False)
        whole = held // body
        blocks = np.empty((whole, seq_len), dtype=BLOCK_DTYPE)
        blocks[:, 0] = bos
        blocks[:, -1] = eos
        blocks[:, 1:-1] = stream[: whole * body].reshape(whole, body)
        yield from blocks
        rest = stream[whole * body :]
        parts = [rest] if len(rest) else []
        held = len(rest)


def pack_documents(
    docs: Iterable[np.ndarray], seq_len: int, *, bos: int = 0, eos: int = 2, pad: int = 1
) -> Iterator[np.ndarray]:
    """DOC-SENTENCES packing: blocks never cross documents; the remainder is padded.

    Args:
        docs: token id arrays, one per document (no specials).
        seq_len: block length including ``<s>`` and ``</s>`` (>= 3).
        bos: id of ``<s>``.
        eos: id of ``</s>``.
        pad: id of ``<pad>`` used to fill short blocks.

    Returns:
        An iterator of int32 arrays of length ``seq_len``; ``ceil(len(doc) / (seq_len - 2))``
        blocks per document.
    """
    body = seq_len - 2
    if body < 1:
        raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    for doc in docs:
        for start in range(0, len(doc), body):
            yield _frame(doc[start : start + body], seq_len, bos, eos, pad)


def pack(docs: Iterable[np.ndarray], seq_len: int, mode: PackMode, *, bos: int = 0, eos: int = 2, pad: int = 1) -> Iterator[np.ndarray]:
    """Dispatch to :func:`pack_full_sentences` (``"full_sentences"``) or :func:`pack_documents` (``"doc"``)."""
    if mode == "full_sentences":
        return pack_full_sentences(docs, seq_len, bos=bos, eos=eos)
    if mode == "doc":
        return pack_documents(docs, seq_len, bos=bos, eos=eos, pad=pad)
    raise ValueError(f"pack mode must be 'full_sentences' or 'doc', got {mode!r}")


def block_count_lower_bound(num_docs: int, num_tokens: int, seq_len: int, mode: PackMode) -> int:
    """Blocks a run of documents yields at least, from its counts alone.

    ``full_sentences`` mode is exact for a contiguous stream: ``floor((tokens + docs) / (seq_len - 2))``
    (one separator per document). ``doc`` mode depends on each document's length, so this returns
    the bound ``max(docs, ceil(tokens / (seq_len - 2)))``.

    Args:
        num_docs: documents in the run.
        num_tokens: tokens in the run (no separators).
        seq_len: block length.
        mode: ``"full_sentences"`` or ``"doc"``.

    Returns:
        The number of blocks (a lower bound in ``doc`` mode).
    """
    body = seq_len - 2
    if mode == "full_sentences":
        return (num_tokens + num_docs) // body
    return max(num_docs, -(-num_tokens // body))
