"""SentencePiece tokenizer: RoBERTa special ids, <mask> as one id, byte fallback, HF parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import corpus_docs, corpus_file, tok, tokenizer_dir  # noqa: F401

from data_pipelines.errors import DataError
from data_pipelines.tokenizer import META_FILE, load_tokenizer, train_tokenizer


def test_special_ids_are_fairseq_roberta(tok):
    assert [tok.id_to_piece(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 800


def test_literal_mask_is_one_id(tok):
    ids = tok.encode("The capital of France is <mask>.")
    assert ids.count(tok.mask_id) == 1
    # The mask takes the space before it: "▁is <mask>", never "▁is ▁ <mask>" (a masked "▁word" in pretraining
    # is a bare <mask>, so a lone "▁" before one is a context the model never saw).
    before = tok.id_to_piece(ids[ids.index(tok.mask_id) - 1])
    assert before == "▁is", before
    assert tok.encode("<mask> is here")[0] == tok.mask_id


def test_corpus_text_never_becomes_a_control_id(tok, corpus_docs):
    """Shards encode corpus text with <mask> a control piece: a literal one is plain pieces, as <s>, </s>, <pad> and
    <unk> are (SentencePiece reads no control piece from text); every other text keeps its ids."""
    text = "Old <s>price</s>, <pad> and <mask> <unk> x<mask>y"
    spelled = tok.encode_corpus([text])[0]
    assert not set(spelled) & set(tok.special_ids) and tok.decode(spelled) == text
    assert tok.encode(text).count(tok.mask_id) == 2  # user text (fill-mask, fine-tuning) still has its masks
    assert tok.encode_corpus(corpus_docs[:200]) == tok.encode_batch(corpus_docs[:200])


def test_byte_fallback_round_trips_any_text(tok):
    text = "naïve café — 日本語 🙂 tabs\tand\nnewlines"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_metadata_and_hash(tok, tokenizer_dir):
    meta = json.loads((tokenizer_dir / META_FILE).read_text())
    assert meta["hash"] == tok.hash and len(tok.hash) == 16
    assert meta["special_ids"] == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    assert meta["vocab_size"] == tok.vocab_size
    assert load_tokenizer(tokenizer_dir).hash == tok.hash


def test_training_is_deterministic_and_sampled(tmp_path, corpus_file, corpus_docs, tok, tokenizer_dir):
    # A tiny sentence budget still trains (bounded memory on a large corpus) and the same
    # settings give the same model, hence the same hash that tags shards.
    a = train_tokenizer(corpus_file, tmp_path / "a", vocab_size=400, input_sentence_size=1000, seed=1)
    b = train_tokenizer(corpus_file, tmp_path / "b", vocab_size=400, input_sentence_size=1000, seed=1)
    assert a.hash == b.hash
    assert a.hash != tok.hash
    assert a.vocab_size == 400
    # The meta file says how many lines were read (the corpus's non-blank lines) and how many sampled: the budget,
    # or every line when the corpus has fewer (the fixture's budget of 50,000).
    lines = sum(1 for doc in corpus_docs for line in doc.split("\n") if line.strip())
    assert 1000 < lines < 50_000
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert (meta["lines_read"], meta["lines_sampled"]) == (lines, 1000)
    meta = json.loads((tokenizer_dir / META_FILE).read_text())
    assert (meta["lines_read"], meta["lines_sampled"]) == (lines, lines)


def test_hf_autotokenizer_parity_on_real_text(tok, tokenizer_dir, corpus_docs):
    transformers = pytest.importorskip("transformers")  # dev dependency; installed in CI
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    # SentencePiece treats a literal "<s>" in text as characters while HF (like RobertaTokenizer)
    # treats it as the special token; documented in docs/data.md and left out here.
    literal = ("<s>", "</s>", "<pad>", "<unk>")
    texts = [d for d in corpus_docs if not any(s in d for s in literal)]
    texts += ["Paris is the <mask> of France.", "naïve café — 日本語 🙂", "two  spaces and\ttabs"]
    assert len(texts) > 1000
    mismatches = [t for t in texts if hf(t)["input_ids"] != [0] + tok.encode(t) + [2]]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[0][:80]!r}"
    pair = hf("first", "second")["input_ids"]
    assert pair == [0] + tok.encode("first") + [2, 2] + tok.encode("second") + [2]
    text = "Paris is the capital of France; naïve café."
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text == tok.decode(tok.encode(text))


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt"):
        train_tokenizer(empty, tmp_path / "tok", vocab_size=300)


def test_too_small_vocab_is_a_clear_error(tmp_path, corpus_file):
    with pytest.raises(DataError, match=r"vocab_size 280 is too small for this corpus: .* need \d+ ids"):
        train_tokenizer(corpus_file, tmp_path / "tok", vocab_size=280, input_sentence_size=2000)


def test_not_a_tokenizer_dir(tmp_path):
    with pytest.raises(DataError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)


def test_bad_input_after_the_first_document_is_our_one_line_error_and_leaves_no_empty_dir(tmp_path):
    # SentencePiece reads our iterator; an error it meets there used to come back wrapped as
    # "SentencePiece training failed: INTERNAL: DataError: ...", and the new --out directory stayed behind.
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a first good document"}\n{"text": "broken\n')
    out = tmp_path / "tok"
    with pytest.raises(DataError) as err:
        train_tokenizer(corpus, out, vocab_size=300)
    message = str(err.value)
    assert message.startswith(f"{corpus}:2: bad json") and "column" in message and "SentencePiece" not in message
    assert "\n" not in message and "--on-error skip" in message
    assert not out.exists()


def stdlib_source(*names: str) -> str:
    """Python source shipped with the interpreter: real text with indentation, on every machine."""
    import importlib

    return "\n\n".join(Path(importlib.import_module(name).__file__).read_text() for name in names)


def test_whitespace_pieces_make_indentation_cheap_and_round_trip(tmp_path):
    """Runs of spaces were one bare "▁" per space (24% of the tokens of a code-heavy corpus). Whitespace
    pieces make a run one token or two: on unseen Python source the whitespace-only share falls by more than
    half, decode still returns the text exactly, and the HF tokenizer.json gives the same ids."""
    transformers = pytest.importorskip("transformers")  # dev dependency; installed in CI
    corpus = tmp_path / "code.txt"
    corpus.write_text(stdlib_source("argparse", "dataclasses", "enum", "pathlib", "subprocess"))
    test_text = stdlib_source("json.decoder", "textwrap", "shlex")
    shares = {}
    for pieces in (True, False):
        tok = train_tokenizer(corpus, tmp_path / str(pieces), vocab_size=1000, whitespace_pieces=pieces, num_threads=1)
        ids = np.asarray(tok.encode(test_text))
        shares[pieces] = (float(tok.whitespace_table()[ids].mean()), len(ids))
        assert tok.decode(ids.tolist()) == test_text  # indentation, blank lines and all
    print("whitespace-only share, tokens (pieces, none):", shares)
    assert shares[True][0] < shares[False][0] / 2 and shares[True][1] < shares[False][1] * 0.85, shares
    meta = json.loads((tmp_path / "True" / META_FILE).read_text())
    assert meta["whitespace_pieces"] is True

    # HF parity on indented code. Documents are stripped when read (corpus.iter_documents), so a text never
    # starts with whitespace (there SentencePiece adds its "▁" prefix to the run and Metaspace does not).
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "True"))
    tok = load_tokenizer(tmp_path / "True")
    chunks = [c.strip() for c in test_text.split("\n\n") if c.strip()]
    assert sum("\n        " in c for c in chunks) > 20  # the point: many chunks hold indented lines
    mismatches = [c for c in chunks if hf(c)["input_ids"] != [0] + tok.encode(c) + [2]]
    assert not mismatches, f"{len(mismatches)} of {len(chunks)} differ, e.g. {mismatches[0][:80]!r}"
