"""Dynamic masking: statistics, specials, whole words, spans, determinism — on real token blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import corpus_docs, corpus_file, one_thread, tok, tokenizer_dir  # noqa: F401
from data_pipelines.masking import IGNORE_INDEX, Masker, MaskingConfig, mask_generator
from data_pipelines.packing import pack_documents, pack_full_sentences


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blocks(tok, corpus_docs) -> torch.Tensor:
    """Real FULL-SENTENCES blocks of 128 tokens (with </s> separators inside)."""
    docs = [np.asarray(ids) for ids in tok.encode_batch(corpus_docs)]
    return torch.from_numpy(np.stack(list(pack_full_sentences(docs, 128))).astype(np.int64))


@pytest.fixture(scope="module")
def padded_blocks(tok, corpus_docs) -> torch.Tensor:
    """Real doc-mode blocks (with padding) of 64 tokens."""
    docs = [np.asarray(ids) for ids in tok.encode_batch(corpus_docs[:300])]
    return torch.from_numpy(np.stack(list(pack_documents(docs, 64))).astype(np.int64))


def _masker(tok, **kw) -> Masker:
    return Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(**kw), word_start=tok.word_start_table())


def test_mask_fraction_and_80_10_10(tok, blocks):
    masker = _masker(tok)
    masked, labels = masker(blocks, mask_generator(0, 0, 0))
    maskable = ~masker.special[blocks]
    selected = labels != IGNORE_INDEX
    n = int(maskable.sum())
    assert n > 100_000  # enough tokens for the tolerances below to be several sigmas wide
    frac = selected.sum().item() / n
    assert abs(frac - 0.15) < 0.005, frac
    assert torch.equal(labels[selected], blocks[selected])  # labels are the original ids
    to_mask = (masked == tok.mask_id) & selected
    unchanged = (masked == blocks) & selected
    changed_random = selected & ~to_mask & ~unchanged
    k = selected.sum().item()
    assert abs(to_mask.sum().item() / k - 0.8) < 0.01
    # "random" can land on the original id (1/|vocab|), so count random+kept together too.
    assert abs(changed_random.sum().item() / k - 0.1 * (1 - 1 / len(masker.replacement_ids))) < 0.01
    assert abs(unchanged.sum().item() / k - 0.1) < 0.01
    # Random replacements are ordinary tokens only.
    assert not masker.special[masked[changed_random]].any()
    # Unselected positions are untouched.
    assert torch.equal(masked[~selected], blocks[~selected])


def test_specials_and_padding_never_masked(tok, padded_blocks):
    assert (padded_blocks == tok.pad_id).sum() > 1000  # the doc-mode blocks really contain padding
    for kw in ({}, {"whole_word": True}, {"span": True}):
        masker = _masker(tok, mask_prob=0.5, **kw)
        for step in range(5):
            masked, labels = masker(padded_blocks, mask_generator(1, step, 0))
            special = masker.special[padded_blocks]
            assert (labels[special] == IGNORE_INDEX).all(), kw
            assert torch.equal(masked[special], padded_blocks[special]), kw


def test_whole_word_masking_takes_every_piece(tok, blocks):
    masker = _masker(tok, whole_word=True)
    _, labels = masker(blocks, mask_generator(0, 3, 0))
    selected = labels != IGNORE_INDEX
    starts, word = masker._word_index(blocks)
    maskable = ~masker.special[blocks]
    multi_piece_words = 0
    for row in range(blocks.shape[0]):
        for w in torch.unique(word[row][selected[row]]).tolist():
            members = (word[row] == w) & maskable[row]
            assert selected[row][members].all(), "a word was only partly masked"
            multi_piece_words += int(members.sum() > 1)
    assert multi_piece_words > 100  # the property was exercised on real multi-piece words
    frac = selected.sum().item() / maskable.sum().item()
    assert 0.12 < frac < 0.18, frac


def test_word_start_table_matches_pieces(tok):
    table = tok.word_start_table()
    assert table[tok.piece_to_id("\u2581the")]
    byte_piece = tok.piece_to_id("<0xC3>")
    assert not table[byte_piece]
    assert all(table[i] for i in tok.special_ids)


def test_span_masking_makes_contiguous_spans(tok, blocks):
    masker = _masker(tok, span=True)
    token_masker = _masker(tok)
    _, labels = masker(blocks, mask_generator(0, 0, 0))
    _, token_labels = token_masker(blocks, mask_generator(0, 0, 0))

    def mean_run(selected: torch.Tensor) -> float:
        runs = []
        for row in selected.tolist():
            length = 0
            for s in row + [False]:
                if s:
                    length += 1
                elif length:
                    runs.append(length)
                    length = 0
        return float(np.mean(runs))

    selected = labels != IGNORE_INDEX
    frac = selected.sum().item() / (~masker.special[blocks]).sum().item()
    assert 0.12 < frac < 0.18, frac
    # SpanBERT spans average ~3.8 words (~5+ pieces); independent tokens average ~1.2.
    assert mean_run(selected) > 3.0
    assert mean_run(token_labels != IGNORE_INDEX) < 1.4
    # Spans consist of whole words: no selected run starts inside a word.
    starts, _ = masker._word_index(blocks)
    run_start = selected.clone()
    run_start[:, 1:] &= ~selected[:, :-1]
    assert starts[run_start].all()


def test_masks_are_a_function_of_seed_step_rank(tok, blocks):
    masker = _masker(tok, whole_word=True)
    a = masker(blocks[:8], mask_generator(7, 11, 2))
    b = masker(blocks[:8], mask_generator(7, 11, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (mask_generator(7, 12, 2), mask_generator(7, 11, 3), mask_generator(8, 11, 2)):
        c = masker(blocks[:8], other)
        assert not torch.equal(a[1], c[1])


def test_config_is_validated():
    with pytest.raises(ValueError, match="mask_prob"):
        MaskingConfig(mask_prob=0.0)
    with pytest.raises(ValueError, match="random_prob"):
        MaskingConfig(random_prob=0.6, keep_prob=0.6)
