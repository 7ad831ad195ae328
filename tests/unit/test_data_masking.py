"""Dynamic masking: statistics, specials, whole words, spans, determinism — on real token blocks."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import corpus_docs, corpus_file, one_thread, tok, tokenizer_dir  # noqa: F401

from data_pipelines.contract import IGNORE_INDEX
from data_pipelines.masking import STRATEGIES, Masker, MaskingConfig, MaskingStrategy, Strategy, mask_generator
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
    for kw in ({}, {"strategy": "whole_word"}, {"strategy": "span"}):
        masker = _masker(tok, mask_prob=0.5, **kw)
        for step in range(5):
            masked, labels = masker(padded_blocks, mask_generator(1, step, 0))
            special = masker.special[padded_blocks]
            assert (labels[special] == IGNORE_INDEX).all(), kw
            assert torch.equal(masked[special], padded_blocks[special]), kw


def test_whole_word_masking_takes_every_piece(tok, blocks):
    masker = _masker(tok, strategy="whole_word")
    _, labels = masker(blocks, mask_generator(0, 3, 0))
    selected = labels != IGNORE_INDEX
    starts, word = masker.word_index(blocks)
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
    masker = _masker(tok, strategy="span")
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
    starts, _ = masker.word_index(blocks)
    run_start = selected.clone()
    run_start[:, 1:] &= ~selected[:, :-1]
    assert starts[run_start].all()


def test_masks_are_a_function_of_seed_step_rank(tok, blocks):
    masker = _masker(tok, strategy="whole_word")
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
    with pytest.raises(ValueError, match="span_p"):
        MaskingConfig(strategy="span", span_p=0.0)


def test_a_strategy_is_chosen_by_its_name():
    with pytest.raises(ValueError, match="'wholeword' is not one of token, whole_word, span"):
        MaskingConfig(strategy="wholeword")
    # The config's typed choice is generated from the registry, and a member of it is taken as its plain name.
    assert [m.value for m in MaskingStrategy] == list(STRATEGIES)
    config = MaskingConfig(strategy=MaskingStrategy.span)
    assert config.strategy == "span" and type(config.strategy) is str and config.needs_words


def test_a_new_strategy_is_one_registry_entry(tok, blocks, monkeypatch):
    # A strategy only selects; registered, it masks through the Masker like the others: 80/10/10 of what it
    # selects, labels there, specials never. Here: the maskable tokens at even positions.
    def even_positions(masker, input_ids, maskable, generator, rate):
        selected = maskable.clone()
        selected[:, 1::2] = False
        return selected, torch.rand(input_ids.shape, generator=generator)

    monkeypatch.setitem(STRATEGIES, "even_positions", Strategy("even_positions", even_positions))
    masker = _masker(tok, strategy="even_positions")
    masked, labels = masker(blocks, mask_generator(0, 0, 0))
    expected = ~masker.special[blocks]
    expected[:, 1::2] = False
    assert torch.equal(labels != IGNORE_INDEX, expected)
    assert torch.equal(labels[expected], blocks[expected])
    assert 0.75 < (masked[expected] == tok.mask_id).float().mean() < 0.85
    assert torch.equal(masked[~expected], blocks[~expected])


@pytest.mark.slow
def test_a_misspelt_strategy_fails_at_compose_time_naming_the_allowed_ones():
    def train(*overrides):  # roberta-pl-train, printing the composed job config
        return subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *overrides, "--cfg", "job"],
                              cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)

    bad = train("data.masking=wholeword")
    assert bad.returncode != 0
    assert "Invalid value 'wholeword', expected one of [token, whole_word, span]" in bad.stdout + bad.stderr
    good = train("data.masking=whole_word")
    assert good.returncode == 0, good.stderr
    assert "  masking: whole_word\n" in good.stdout


# -- issue 13, findings 7 and 8 ----------------------------------------------------------------


def _runs(selected_row: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs of selected positions, as (start, end) half-open ranges."""
    runs, start = [], None
    for i, s in enumerate(selected_row + [False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_span_masking_realises_mask_prob(tok, blocks, padded_blocks):
    # SpanBERT's budget is mask_prob of the tokens. Spans cut at row ends and specials that could
    # not start spans left the realised rate at 14.1-14.9%; it must be 15% over many batches.
    for mask_prob, data in ((0.15, blocks), (0.15, padded_blocks), (0.3, blocks)):
        masker = _masker(tok, strategy="span", mask_prob=mask_prob)
        maskable = ~masker.special[data]
        selected = total = step = 0
        while total < 2_500_000:
            _, labels = masker(data, mask_generator(5, step, 0))
            selected += (labels != IGNORE_INDEX).sum().item()
            total += maskable.sum().item()
            step += 1
        # One batch's rate varies by ~0.003 (spans of ~5 tokens come and go together): ~0.0007 over these.
        assert abs(selected / total - mask_prob) < 0.0025, (mask_prob, data.shape, selected / total)


def test_span_masking_decides_80_10_10_per_span(tok, blocks):
    masker = _masker(tok, strategy="span")
    kinds = Counter()
    for step in range(3):
        masked, labels = masker(blocks, mask_generator(2, step, 0))
        selected = labels != IGNORE_INDEX
        for row in range(blocks.shape[0]):
            for start, end in _runs(selected[row].tolist()):
                got, orig = masked[row, start:end], blocks[row, start:end]
                is_mask = got == tok.mask_id
                if is_mask.any():
                    assert is_mask.all(), f"a span mixes <mask> with other tokens: {got.tolist()}"
                    kinds["mask"] += 1
                elif torch.equal(got, orig):
                    kinds["keep"] += 1
                else:
                    # A random span: every token random (each may land on its original id, 1/|vocab|).
                    assert (got != orig).float().mean() > 0.5
                    kinds["random"] += 1
    spans = sum(kinds.values())
    assert spans > 5000
    assert abs(kinds["mask"] / spans - 0.8) < 0.02, kinds
    assert abs(kinds["random"] / spans - 0.1) < 0.015, kinds
    assert abs(kinds["keep"] / spans - 0.1) < 0.015, kinds


def _words(tok, masker: Masker, ids: list[int]) -> list[str]:
    """The text of each word, as whole-word and span masking split ``ids``."""
    starts, _ = masker.word_index(torch.tensor([ids]))
    cuts = [i for i, s in enumerate(starts[0].tolist()) if s] + [len(ids)]

    def text(piece_ids: list[int]) -> str:
        raw = b"".join(bytes([int(tok.id_to_piece(i)[3:-1], 16)]) if tok.sp.is_byte(i) else tok.id_to_piece(i).replace("\u2581", " ").encode()
                       for i in piece_ids)
        return raw.decode("utf-8", errors="replace")

    return [text(ids[a:b]) for a, b in zip(cuts, cuts[1:])]


def test_words_break_at_newlines_and_punctuation(tok):
    masker = _masker(tok, strategy="whole_word")
    ids = tok.encode("Return the value.\nIf x is None, raise (foo.bar) an error; don't.\n\tIndented line")
    assert tok.piece_to_id("<0x0A>") in ids and tok.piece_to_id("<0x09>") in ids  # newline/tab are byte pieces here
    assert _words(tok, masker, ids) == [
        " Return", " the", " value", ".", "\n", "If", " x", " is", " None", ",", " raise", " (", "foo", ".", "bar", ")",
        " an", " error", ";", " don", "'", "t", ".", "\n", "\t", "Indented", " line",
    ]


def test_words_on_real_multi_line_text(tok, corpus_docs):
    # Real documents with their sentences on separate lines (as in JSON-lines corpora): a line's
    # first word must not join the previous line's last word, nor a word its trailing punctuation.
    masker = _masker(tok, strategy="whole_word")
    text = "\n".join(s for doc in corpus_docs[:150] for s in doc.split(". ") if s)
    ids = tok.encode(text)
    words = _words(tok, masker, ids)
    assert "".join(words) == " " + text  # SentencePiece's dummy prefix: the text starts with "▁"
    assert words.count("\n") == text.count("\n") > 300
    punctuation = set(".,;:()'\"[]{}=+-*/<>!?`")
    for word in words:
        if word == "\n":
            continue
        assert "\n" not in word, repr(word)
        core = word.lstrip(" ")
        # A word is either made only of punctuation, or holds none at its edges.
        if not set(core) <= punctuation:
            assert core[0] not in punctuation and core[-1] not in punctuation, repr(word)
    # Whole-word masking on these ids never masks part of a line-initial word.
    batch = torch.tensor([ids[i : i + 128] for i in range(0, len(ids) - 128, 128)])
    _, labels = masker(batch, mask_generator(0, 0, 0))
    selected = labels != IGNORE_INDEX
    starts, word = masker.word_index(batch)
    newline = batch == tok.piece_to_id("<0x0A>")
    after_newline = torch.zeros_like(newline)
    after_newline[:, 1:] = newline[:, :-1]
    assert starts[after_newline].all()
    for row in range(batch.shape[0]):
        for w in torch.unique(word[row][selected[row]]).tolist():
            assert selected[row][word[row] == w].all()
