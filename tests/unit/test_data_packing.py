"""FULL-SENTENCES and doc packing are lossless and shaped as specified."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import corpus_docs, corpus_file, tok, tokenizer_dir  # noqa: F401

from data_pipelines.packing import (
    block_count_lower_bound,
    pack,
    pack_documents,
    pack_full_sentences,
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
    with pytest.raises(ValueError, match="pack mode"):
        pack([np.arange(5)], 16, "bogus")
