"""FULL-SENTENCES, doc and packed_docs packing are lossless and shaped as specified."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import corpus_docs, corpus_file, tok, tokenizer_dir  # noqa: F401

from data_pipelines.packing import (
    block_count_lower_bound,
    document_ids,
    pack,
    pack_documents,
    pack_full_sentences,
    pack_packed_docs,
)

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def docs(tok, corpus_docs) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.uint16) for ids in tok.encode_batch(corpus_docs[:400])]


@pytest.mark.parametrize("seq_len", [5, 64, 512])
def test_full_sentences_is_lossless_and_unpadded(docs, seq_len):
    blocks = np.stack(list(pack_full_sentences(docs, seq_len)))
    assert blocks.shape[1] == seq_len
    assert (blocks[:, 0] == BOS).all() and (blocks[:, -1] == EOS).all()
    assert not (blocks == PAD).any()  # no padding waste
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    body = seq_len - 2
    assert len(blocks) == len(stream) // body == block_count_lower_bound(len(docs), sum(map(len, docs)), seq_len, "full_sentences")
    # The bodies, concatenated, are the documents with their separators, in order.
    np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), stream[: len(blocks) * body])
    # Blocks do cross documents (the point of FULL-SENTENCES).
    assert any((b[1:-1] == EOS).any() for b in blocks)


def test_doc_mode_never_crosses_documents(docs):
    seq_len = 64
    blocks = list(pack_documents(docs, seq_len))
    assert sum(-(-len(d) // (seq_len - 2)) for d in docs) == len(blocks)
    assert len(blocks) >= block_count_lower_bound(len(docs), sum(map(len, docs)), seq_len, "doc")
    rebuilt, i = [], 0
    for d in docs:
        pieces = []
        while sum(map(len, pieces)) < len(d):
            b = blocks[i]
            i += 1
            assert b[0] == BOS
            body = b[1:][b[1:] != PAD]
            assert body[-1] == EOS and not (body[:-1] == EOS).any()  # exactly one document inside
            pieces.append(body[:-1])
        rebuilt.append(np.concatenate(pieces))
    for a, b in zip(rebuilt, docs):
        np.testing.assert_array_equal(a, b)


def test_bad_seq_len_and_mode():
    with pytest.raises(ValueError, match="seq_len"):
        list(pack_full_sentences([np.arange(5)], 2))
    with pytest.raises(ValueError, match="pack mode must be one of full_sentences, doc, packed_docs; got 'bogus'"):
        pack([np.arange(5)], 16, "bogus")


@pytest.mark.parametrize("seq_len", [3, 64, 512])
def test_packed_docs_frames_every_document_and_is_lossless_and_unpadded(docs, seq_len):
    blocks = np.stack(list(pack_packed_docs(docs, seq_len)))
    assert blocks.shape[1] == seq_len and not (blocks == PAD).any()
    stream = np.concatenate([np.concatenate([[BOS], d, [EOS]]) for d in docs])
    assert len(blocks) == len(stream) // seq_len == block_count_lower_bound(len(docs), sum(map(len, docs)), seq_len,
                                                                             "packed_docs")
    # The blocks, concatenated, are the documents each as <s> ... </s>, in order: nothing lost, nothing added.
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: blocks.size])
    ids = document_ids(blocks, BOS)
    for row, row_ids in zip(blocks, ids):
        # A document of the row: a run of equal ids; it starts with <s> unless it is the row's first (the rest of
        # a document the previous block cut), and it holds no other special than its own </s> at its end.
        for d in np.unique(row_ids):
            tokens = row[row_ids == d]
            assert (tokens[0] == BOS) or (d == 0 and row[0] != BOS)
            assert not (tokens[1:] == BOS).any() and not (tokens[:-1] == EOS).any()
    assert (ids[:, -1] > 0).any()  # blocks hold several documents (the corpus's are shorter than 512 tokens)
