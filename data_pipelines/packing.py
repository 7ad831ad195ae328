"""Cut a stream of tokenized documents into fixed-length training blocks.

Three modes, the first two named after the RoBERTa paper's input formats (§4.2):

* ``full`` — FULL-SENTENCES: documents are concatenated with a ``</s>`` after each one, and the
  stream is cut into blocks of exactly ``seq_len`` tokens framed as ``<s> …seq_len-2 tokens… </s>``.
  Blocks cross document boundaries and long documents are cut, so there is no padding at all.
  Concatenating the block bodies gives back the stream exactly (the test checks this).
* ``doc`` — DOC-SENTENCES: a block never crosses a document; each document is cut into bodies of
  at most ``seq_len - 2`` tokens, framed the same way and right-padded with ``<pad>``.
* ``packed_docs`` — documents packed with their boundaries, for attention within each document (ModernBERT's and
  MosaicBERT's packing): every document is framed as its own ``<s> … </s>`` and the framed documents are
  concatenated and cut into blocks of exactly ``seq_len`` tokens. No padding; a document cut by a block's end
  continues at the start of the next block as a new document. The batch carries :func:`document_ids`, which the
  model turns into per-document positions and attention (:mod:`roberta_pl.attention`).

``full_sentences`` and ``packed_docs`` are cuts of one contiguous stream (``STREAM_MODES``): their block counts are
exact from the manifest's counts and a resume seeks by token arithmetic (:func:`stream_tokens`, :func:`block_width`).

All are plain generators over numpy arrays; they hold at most one document plus one block.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np

PackMode = Literal["full_sentences", "doc", "packed_docs"]
STREAM_MODES = ("full_sentences", "packed_docs")  # blocks are cuts of one contiguous stream: exact counts, seekable
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
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    sep = np.array([eos], dtype=BLOCK_DTYPE)
    for bodies in _cut(((doc, sep) for doc in docs), seq_len - 2):
        blocks = np.empty((len(bodies), seq_len), dtype=BLOCK_DTYPE)
        blocks[:, 0] = bos
        blocks[:, -1] = eos
        blocks[:, 1:-1] = bodies
        yield from blocks


def frame_documents(docs: Iterable[np.ndarray], *, bos: int = 0, eos: int = 2) -> Iterator[np.ndarray]:
    """Each document as its own ``<s> … </s>`` (the units ``packed_docs`` packs)."""
    for doc in docs:
        framed = np.empty(len(doc) + 2, dtype=BLOCK_DTYPE)
        framed[0], framed[-1] = bos, eos
        framed[1:-1] = doc
        yield framed


def pack_framed(framed: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """``packed_docs`` packing of documents already framed by :func:`frame_documents` (or a suffix of one, where a
    resume starts): their concatenation cut into blocks of ``seq_len`` tokens, the final partial block dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    for blocks in _cut(((doc,) for doc in framed), seq_len):
        yield from blocks


def pack_packed_docs(docs: Iterable[np.ndarray], seq_len: int, *, bos: int = 0, eos: int = 2) -> Iterator[np.ndarray]:
    """``packed_docs`` packing: each document framed as ``<s> … </s>``, concatenated, cut every ``seq_len`` tokens.

    Args:
        docs: token id arrays, one per document (no specials).
        seq_len: block length.
        bos: id of ``<s>``, which starts each document (and so marks it: see :func:`document_ids`).
        eos: id of ``</s>``, which ends each document.

    Returns:
        An iterator of int32 arrays of length ``seq_len`` (``floor(sum(len(doc) + 2) / seq_len)`` of them); the
        final partial block is dropped.
    """
    return pack_framed(frame_documents(docs, bos=bos, eos=eos), seq_len)


def document_ids(blocks: np.ndarray, bos: int = 0) -> np.ndarray:
    """Which document of its row each token of ``packed_docs`` blocks belongs to: the count of ``<s>`` up to it.

    A row's first tokens before its first ``<s>`` (the rest of a document cut by the previous block) are
    document 0; every ``<s>`` starts the next. Documents hold no specials (shards encode a corpus with
    ``encode_corpus``, which spells a literal ``<s>`` in ordinary pieces), so ``<s>`` marks exactly the starts.

    Args:
        blocks: ``[B, T]`` unmasked token ids (masking never touches ``<s>``, but take them before it).
        bos: id of ``<s>``.

    Returns:
        ``[B, T]`` int64, non-decreasing along each row.
    """
    return np.cumsum(blocks == bos, axis=-1, dtype=np.int64)


def _cut(pieces_per_doc: Iterable[tuple[np.ndarray, ...]], width: int) -> Iterator[np.ndarray]:
    """Concatenate each document's pieces and cut the stream into ``[n, width]`` arrays of whole rows."""
    parts: list[np.ndarray] = []
    held = 0
    for pieces in pieces_per_doc:
        parts.extend(pieces)
        held += sum(len(p) for p in pieces)
        if held < width:
            continue
        # One concatenate per *document* (not per block) keeps this at numpy speed even for
        # short documents; a long document yields many blocks from one concatenate.
        stream = np.concatenate(parts).astype(BLOCK_DTYPE, copy=False)
        whole = held // width
        yield stream[: whole * width].reshape(whole, width)
        rest = stream[whole * width :]
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
    """Dispatch to :func:`pack_full_sentences` (``"full_sentences"``), :func:`pack_documents` (``"doc"``) or
    :func:`pack_packed_docs` (``"packed_docs"``)."""
    if mode == "full_sentences":
        return pack_full_sentences(docs, seq_len, bos=bos, eos=eos)
    if mode == "doc":
        return pack_documents(docs, seq_len, bos=bos, eos=eos, pad=pad)
    if mode == "packed_docs":
        return pack_packed_docs(docs, seq_len, bos=bos, eos=eos)
    raise ValueError(f"pack mode must be one of {', '.join(typing.get_args(PackMode))}; got {mode!r}")


def stream_tokens(num_docs: int, num_tokens: int, mode: PackMode) -> int:
    """Tokens of a run of documents in the contiguous stream a ``STREAM_MODES`` mode cuts: one ``</s>`` separator per
    document in ``full_sentences``, a ``<s>`` and a ``</s>`` in ``packed_docs``."""
    return num_tokens + num_docs * (2 if mode == "packed_docs" else 1)


def block_width(seq_len: int, mode: PackMode) -> int:
    """Stream tokens per block: ``seq_len - 2`` in ``full_sentences`` (each block adds its own ``<s>``/``</s>``),
    ``seq_len`` in ``packed_docs`` (the specials are in the stream)."""
    return seq_len if mode == "packed_docs" else seq_len - 2


def block_count_lower_bound(num_docs: int, num_tokens: int, seq_len: int, mode: PackMode) -> int:
    """Blocks a run of documents yields at least, from its counts alone.

    ``full_sentences`` mode is exact for a contiguous stream: ``floor((tokens + docs) / (seq_len - 2))``
    (one separator per document), and so is ``packed_docs``: ``floor((tokens + 2 * docs) / seq_len)``.
    ``doc`` mode depends on each document's length, so this returns the bound
    ``max(docs, ceil(tokens / (seq_len - 2)))``.

    Args:
        num_docs: documents in the run.
        num_tokens: tokens in the run (no separators).
        seq_len: block length.
        mode: a :data:`PackMode`.

    Returns:
        The number of blocks (a lower bound in ``doc`` mode).
    """
    if mode in STREAM_MODES:
        return stream_tokens(num_docs, num_tokens, mode) // block_width(seq_len, mode)
    return max(num_docs, -(-num_tokens // (seq_len - 2)))
