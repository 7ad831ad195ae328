"""Any HF RoBERTa-family tokenizer on the data side: a byte-level BPE in roberta-base's layout and a SentencePiece
unigram in XLM-R's, both trained here on local text (tests/helpers/hf_tokenizers.py), against ``transformers``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from data_fixtures import mlm_datamodule, one_thread, tokenizer_dir  # noqa: F401
from hf_tokenizers import byte_bpe_tokenizer_dir, local_texts, xlmr_tokenizer_dir

from data_pipelines.cli import main as data_cli
from data_pipelines.contract import IGNORE_INDEX
from data_pipelines.corpus import iter_documents
from data_pipelines.errors import DataError, SkipReport
from data_pipelines.hf_tokenizer import HFTokenizer
from data_pipelines.manifest import load_manifest
from data_pipelines.masking import Masker, MaskingConfig
from data_pipelines.packing import document_ids, pack_packed_docs
from data_pipelines.shard_format import iter_shard
from data_pipelines.shards import write_shards
from data_pipelines.task_data import load_text_tokenizer
from data_pipelines.tokenizer import ENDS_WORD, STARTS_WORD, SpmTokenizer, load_tokenizer
from roberta_pl.inference import fill_mask
from roberta_pl.model import RobertaConfig, RobertaForMaskedLM

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
KINDS = ("byte_bpe", "xlmr")
BUILDERS = {"byte_bpe": byte_bpe_tokenizer_dir, "xlmr": xlmr_tokenizer_dir}
MARKS = {"byte_bpe": "Ġ", "xlmr": "\u2581"}
# Literal <mask>s where a space before it, none, or other text sits next to it.
# Specials typed in a corpus (HTML strikethrough, code, a tokenizer's docs): text, never control ids in shards.
SPECIALS_TEXT = "Was <s>strike</s> now, a <pad> here, <mask> there and </s><unk> <s>."
MASK_LINES = ["The <mask> sat.", "<mask> at the start", "at the end <mask>", "glued<mask>text", "two  spaces  <mask>  x",
              "tab\t<mask>\nnewline <mask>", "<mask><mask> twice", "Ünïcödé façade — “quotes” 日本語 <mask> ✓"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Local lines unlike the training lines: the tokenizers are trained on the first 2000."""
    return local_texts(6000)[2000:]


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    base, train = tmp_path_factory.mktemp("hf_tok"), local_texts(2000)
    return {k: build(base / k, train) for k, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def hf_dir(hf_dirs, kind) -> Path:
    return hf_dirs[kind]


def _auto(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path)


def test_ids_and_specials_are_transformers(hf_dir, kind, texts):
    tok, hf = load_tokenizer(hf_dir), _auto(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.mark == MARKS[kind]
    lines = MASK_LINES + texts
    expected = [hf(t, add_special_tokens=False).input_ids for t in lines]
    mismatches = [t for t, ids in zip(lines, expected) if tok.encode(t) != ids]
    assert not mismatches, mismatches[:3]
    assert tok.encode_batch(lines) == expected
    # "The <mask> sat.": <mask> takes the space before it, as roberta-base's does.
    assert [tok.id_to_piece(i) for i in tok.encode("The <mask> sat.")][:2] == [f"{MARKS[kind]}The" if kind == "xlmr" else "The", "<mask>"]
    # Specials from the tokenizer: fairseq's <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> the last id.
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3) == (
        hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id)
    assert tok.mask_id == hf.mask_token_id == tok.vocab_size - 1 == len(hf) - 1
    assert set(hf.all_special_ids) <= set(tok.special_ids) and tok.mask_id in tok.special_ids
    assert all(tok.piece_to_id(tok.id_to_piece(i)) == i for i in range(tok.vocab_size))
    assert tok.files[0] == "tokenizer.json" and "tokenizer_config.json" in tok.files
    # Text comes back: exactly for the byte-level BPE; as transformers decodes it for XLM-R (NFKC, collapsed spaces).
    for t in texts[:300]:
        ids = tok.encode(t)
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == (t if kind == "byte_bpe" else hf.decode(ids))


def test_other_forms_of_the_directory_are_the_same_tokenizer(hf_dir, kind, texts, tmp_path):
    """roberta-base's vocab.json + merges.txt, XLM-R's sentencepiece.bpe.model: the same ids and hash as the
    tokenizer.json beside them (and, for XLM-R, transformers' ids for the model file alone)."""
    full = load_tokenizer(hf_dir)
    keep = ("vocab.json", "merges.txt") if kind == "byte_bpe" else ("sentencepiece.bpe.model", "tokenizer_config.json")
    for name in keep:
        shutil.copy(hf_dir / name, tmp_path / name)
    alone = load_tokenizer(tmp_path)
    assert alone.hash == full.hash and alone.files == keep
    assert (alone.vocab_size, alone.special_ids, alone.mask_id) == (full.vocab_size, full.special_ids, full.mask_id)
    lines = MASK_LINES + texts[:1000]
    assert alone.encode_batch(lines) == full.encode_batch(lines)
    assert (alone.word_start_table() == full.word_start_table()).all()
    if kind == "xlmr":
        hf = _auto(tmp_path)
        assert alone.encode_batch(lines) == [hf(t, add_special_tokens=False).input_ids for t in lines]


def test_a_hub_cache_snapshot_reads_through_its_links(hf_dir, tmp_path):
    """~/.cache/huggingface/hub/models--NAME/snapshots/REV/NAME -> ../../blobs/SHA: links inside the repository."""
    repo = tmp_path / "models--roberta-base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(hf_dir.iterdir())):
        shutil.copy(file, repo / "blobs" / f"sha{i}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"sha{i}"))
    assert load_tokenizer(snapshot).hash == load_tokenizer(hf_dir).hash


def test_hash_is_the_content(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    shutil.copytree(hf_dir, tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").hash == tok.hash  # not the path, not the file times
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    spec["added_tokens"][-1]["lstrip"] = not spec["added_tokens"][-1]["lstrip"]  # <mask> changes which ids a text gets
    (tmp_path / "copy" / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path / "copy").hash != tok.hash
    spec["decoder"] = None  # changes no id
    (tmp_path / "copy" / "tokenizer.json").write_text(json.dumps(spec))
    changed = load_tokenizer(tmp_path / "copy").hash
    spec["post_processor"] = None
    (tmp_path / "copy" / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path / "copy").hash == changed


def test_shards_from_the_cli_decode_back_to_the_text(hf_dir, kind, texts, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(texts[i:i + 6]) for i in range(0, 1800, 6)) + "\n")
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "data_pipelines.cli", "-q", "shards", "--tokenizer", str(hf_dir),
                           "--out", str(out), "--num-shards", "2", "--workers", "1", str(corpus)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok, hf = load_tokenizer(hf_dir), _auto(hf_dir)
    manifest = load_manifest(out)
    assert manifest["tokenizer_hash"] == tok.hash and manifest["vocab_size"] == tok.vocab_size
    assert manifest["dtype"] == "uint16"
    read = [ids for split in manifest["splits"].values() for s in split["shards"]
            for ids in iter_shard(str(out / s["name"]), expected_hash=tok.hash, vocab_size=tok.vocab_size,
                                  on_error="raise", report=SkipReport())]
    docs = list(iter_documents(corpus))
    assert Counter(tuple(d.tolist()) for d in read) == Counter(
        tuple(hf(d, add_special_tokens=False).input_ids) for d in docs)
    back = Counter(tok.decode(d.tolist()) for d in read)
    assert back == Counter(docs if kind == "byte_bpe" else [hf.decode(hf(d, add_special_tokens=False).input_ids) for d in docs])
    # inspect reads them with the tokenizer the manifest records, counting its own bare space ("Ġ" or "▁").
    assert data_cli(["inspect", str(out), "--samples", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokenizer_hash"] == tok.hash and summary["samples"][0] in back
    assert 0 < summary["whitespace"]["bare_space_share"] <= summary["whitespace"]["whitespace_share"] < 0.5


def _batch(tok, texts: list[str], width: int = 128) -> torch.Tensor:
    """Rows of ``<s> line </s>`` padded with ``<pad>``, literal <mask>s included."""
    rows = []
    for t in texts:
        ids = [tok.bos_id, *tok.encode(t)[: width - 2], tok.eos_id]
        rows.append(ids + [tok.pad_id] * (width - len(ids)))
    return torch.tensor(rows)


def test_masking_never_touches_a_special_and_draws_real_tokens(hf_dir, texts):
    tok = load_tokenizer(hf_dir)
    ids = _batch(tok, [f"{t} <mask>" if i % 5 == 0 else t for i, t in enumerate(texts[:512])])
    special = torch.zeros(tok.vocab_size, dtype=torch.bool)
    special[list(tok.special_ids)] = True
    assert special[ids].any()  # <s>, </s>, <pad> and literal <mask>s are there to be left alone
    for strategy in ("token", "whole_word", "span"):
        masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(mask_prob=0.3, strategy=strategy),
                        word_start=tok.word_start_table())
        masked, labels = masker(ids, torch.Generator().manual_seed(0))
        selected = labels != IGNORE_INDEX
        assert not (selected & special[ids]).any(), strategy  # never masked, never predicted
        assert torch.equal(masked[special[ids]], ids[special[ids]])
        assert torch.equal(labels[selected], ids[selected])
        random = selected & (masked != tok.mask_id) & (masked != ids)
        assert random.sum() > 100, strategy
        drawn = masked[random]
        assert ((drawn >= 0) & (drawn < tok.vocab_size)).all() and not special[drawn].any(), strategy
        assert (masked[selected] == tok.mask_id).float().mean() > 0.7
    # The draw covers the real vocabulary, the last ordinary id included (roberta-base's <mask> is the last id).
    assert masker.replacement_ids.tolist() == [i for i in range(tok.vocab_size) if i not in set(tok.special_ids)]


def _text_words(tok, line: str) -> list[int]:
    """Per token of ``line``, the index of the whitespace-separated word its characters start in."""
    enc = tok.tok.encode(line, add_special_tokens=False)
    starts = [m.start() for m in re.finditer(r"\S+", line)]
    words = []
    for begin, end in enc.offsets:
        while begin < end and line[begin] == " ":
            begin += 1
        words.append(max(i for i, s in enumerate(starts) if s <= begin))
    return words


def test_whole_word_masking_groups_the_tokenizers_own_words(hf_dir, kind, texts):
    tok = load_tokenizer(hf_dir)
    table = tok.word_start_table()
    mark = MARKS[kind]
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if i not in tok.special_ids and piece.startswith(mark):
            assert table[i] & STARTS_WORD, piece
    # Plain words (letters, single spaces): the masker's words are exactly the text's whitespace-separated words.
    lines = [" ".join(re.findall(r"[A-Za-z]+", t)) for t in texts[:400]]
    lines = [t for t in lines if len(t.split()) >= 3 and tok.unk_id not in tok.encode(t)]  # <unk> is a word alone
    masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(strategy="whole_word"), word_start=table)
    for line in lines:
        ids = torch.tensor([tok.encode(line)])
        _, index = masker.word_index(ids)
        assert index[0].tolist() == _text_words(tok, line), line
    # Punctuation, newlines and specials are words on their own.
    ids = tok.encode("foo.bar(baz), qux")
    flags = {tok.id_to_piece(i): int(table[i]) for i in ids}
    assert all(flags[p] == STARTS_WORD | ENDS_WORD for p in flags if p.strip(mark) in (".", "(", "),", ")", ","))
    assert all(table[i] == STARTS_WORD | ENDS_WORD for i in tok.special_ids)
    if kind == "byte_bpe":
        newline = tok.piece_to_id("Ċ")
        assert table[newline] == STARTS_WORD | ENDS_WORD and tok.whitespace_table()[newline]
    # Whole-word masking selects whole words: every word all in or all out.
    batch = _batch(tok, lines)
    masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(mask_prob=0.3, strategy="whole_word"),
                    word_start=table)
    _, labels = masker(batch, torch.Generator().manual_seed(1))
    starts, index = masker.word_index(batch)
    selected = labels != IGNORE_INDEX
    maskable = ~masker.special[batch]
    for r in range(len(batch)):
        for w in index[r][maskable[r]].unique():
            members = selected[r][(index[r] == w) & maskable[r]]
            assert members.all() or not members.any()
    assert 0.2 < selected.sum() / maskable.sum() < 0.4


def test_datamodule_batches_with_an_hf_tokenizer(hf_dirs, texts, tmp_path):
    hf_dir = hf_dirs["xlmr"]
    tok = load_tokenizer(hf_dir)
    docs = ["\n".join(texts[i:i + 6]) for i in range(0, 1800, 6)]
    write_shards(None, hf_dir, tmp_path / "s", documents=docs, num_shards=2, num_workers=0, progress=False)
    dm = mlm_datamodule(str(tmp_path / "s"), hf_dir, seq_len=64, micro_batch_size=8, strategy="span", seed=3)
    batches = [b for _, b in zip(range(6), dm.train_dataloader())]
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert (ids[:, 0] == tok.bos_id).all() and (ids == tok.eos_id).any()
    assert (labels != IGNORE_INDEX).any() and not np.isin(labels[labels != IGNORE_INDEX], tok.special_ids).any()
    assert int(ids.max()) < tok.vocab_size


def test_a_vocabulary_over_65536_ids_writes_int32_shards(hf_dirs, texts, tmp_path):
    """XLM-R has 250002 ids: the shards hold them as int32 (and say so), small vocabularies keep uint16."""
    spec = json.loads((hf_dirs["byte_bpe"] / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    mask = vocab.pop("<mask>")
    vocab.update({f"<extra_{i}>": len(vocab) + i for i in range(70_000)})
    vocab["<mask>"] = len(vocab)
    docs = texts[:200]
    common = Counter(i for ids in load_tokenizer(hf_dirs["byte_bpe"]).encode_batch(docs) for i in ids).most_common(1)
    piece = next(p for p, i in vocab.items() if i == common[0][0])
    vocab[piece], vocab["<extra_69999>"] = vocab["<extra_69999>"], vocab[piece]  # an ordinary piece: 70998
    for t in spec["added_tokens"]:
        t["id"] = vocab["<mask>"] if t["id"] == mask else t["id"]
    big = tmp_path / "big"
    big.mkdir()
    (big / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(big)
    assert tok.vocab_size == 71_000 and tok.mask_id == 70_999
    manifest = write_shards(None, big, tmp_path / "s", documents=docs, num_shards=1, valid_fraction=0.0,
                            num_workers=0, progress=False)
    assert manifest["dtype"] == "int32"
    read = list(iter_shard(str(tmp_path / "s" / manifest["splits"]["train"]["shards"][0]["name"]), expected_hash=tok.hash,
                           vocab_size=tok.vocab_size, on_error="raise", report=SkipReport()))
    assert Counter(tuple(d.tolist()) for d in read) == Counter(tuple(tok.encode(d)) for d in docs)
    assert all(d.dtype == np.int32 for d in read) and max(d.max() for d in read) == vocab[piece] > 65_535


def test_our_tokenizer_json_read_as_hf_agrees_with_sentencepiece(tokenizer_dir, tmp_path, texts):
    """The tokenizer.json we write beside spm.model, read as any HF tokenizer: the same ids, words and whitespace."""
    ours = load_tokenizer(tokenizer_dir)
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    hf = load_tokenizer(tmp_path)
    assert isinstance(ours, SpmTokenizer) and isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.special_ids, hf.mask_id) == (ours.vocab_size, ours.special_ids, ours.mask_id)
    # Lines as the corpus reader gives a document's first line: SentencePiece prefixes "▁" to a text that starts
    # with a space, tokenizers' Metaspace does not (the file's own disagreement, not this reader's).
    lines = MASK_LINES + [t.lstrip() for t in texts[:500]]
    assert hf.encode_batch(lines) == ours.encode_batch(lines)
    assert hf.encode_corpus([SPECIALS_TEXT, *lines]) == ours.encode_corpus([SPECIALS_TEXT, *lines])
    assert (hf.word_start_table() == ours.word_start_table()).all()
    assert (hf.whitespace_table() == ours.whitespace_table()).all()
    assert [hf.token_text(i) for i in range(ours.vocab_size)] == [ours.token_text(i) for i in range(ours.vocab_size)]
    assert hf.space_id == ours.space_id


@pytest.mark.parametrize("which", ["spm", *KINDS])
def test_specials_typed_in_a_corpus_are_text_in_its_shards(which, hf_dirs, tokenizer_dir, texts, tmp_path):
    """A corpus's literal <s>, </s>, <pad>, <mask> are ordinary pieces in its shards: no control id but the ones packing
    adds, so packed_docs finds exactly its documents; fill-mask and fine-tuning text still read a typed <mask>."""
    path = tokenizer_dir if which == "spm" else hf_dirs[which]
    tok = load_tokenizer(path)
    controls = [tok.bos_id, tok.pad_id, tok.eos_id, tok.mask_id]
    docs = ["\n".join(texts[i:i + 3]).strip() + (f" {SPECIALS_TEXT} {texts[i + 3].strip()}" if i % 8 else "")
            for i in range(0, 600, 4)]
    manifest = write_shards(None, path, tmp_path / "s", documents=docs, num_shards=2, valid_fraction=0.0,
                            num_workers=0, progress=False)
    read = [d for s in manifest["splits"]["train"]["shards"]
            for d in iter_shard(str(tmp_path / "s" / s["name"]), expected_hash=tok.hash, vocab_size=tok.vocab_size,
                                on_error="raise", report=SkipReport())]
    assert len(read) == len(docs) and not any(np.isin(d, controls).any() for d in read)
    spelled = tok.encode_corpus([SPECIALS_TEXT])[0]
    assert not set(spelled) & set(tok.special_ids) and len(spelled) > 20
    if which != "xlmr":  # XLM-R's normaliser changes the text; the others decode it back exactly
        assert Counter(tok.decode(d.tolist()) for d in read) == Counter(docs)
    assert Counter(tuple(d.tolist()) for d in read if SPECIALS_TEXT not in tok.decode(d.tolist())) == Counter(
        tuple(ids) for d, ids in zip(docs, tok.encode_batch(docs)) if SPECIALS_TEXT not in d)  # other text: the same ids
    # packed_docs: the <s> count gives one document id per framed document, exactly where its frame starts.
    seq_len = 64
    blocks = np.stack(list(pack_packed_docs(read, seq_len, bos=tok.bos_id, eos=tok.eos_id)))
    starts = np.zeros(sum(len(d) + 2 for d in read), dtype=bool)
    starts[np.cumsum([0, *(len(d) + 2 for d in read[:-1])])] = True
    expected = np.cumsum(starts[: blocks.size].reshape(blocks.shape), axis=1)
    assert np.array_equal(document_ids(blocks, tok.bos_id), expected)
    # User text: fill-mask and fine-tuning still turn a typed <mask> into the mask id.
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                                             intermediate_size=32, max_seq_len=32))
    assert [len(p) for p in fill_mask(model, tok, "The <mask> sat on the <mask>.", top_k=3)] == [3, 3]
    assert [ids.count(tok.mask_id) for ids in load_text_tokenizer(path).encode_batch(MASK_LINES)] == [
        line.count("<mask>") for line in MASK_LINES]


def test_a_merge_that_builds_a_special_does_not_in_corpus_text(tokenizer_dir, tmp_path):
    """Our tokenizer.json with merges that build "<s>" from text: corpus text still spells it in ordinary pieces."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["<s"] = len(vocab)
    spec["model"]["merges"][:0] = [["<", "s"], ["<s", ">"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode_corpus(["a <s>b"])[0]
    assert tok.bos_id not in ids and tok.decode(ids) == "a <s>b" and tok.piece_to_id("<s") in ids


def test_fine_tuning_reads_the_same_class(hf_dir, kind):
    tok = load_text_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    words = "The ThreadPoolExecutor.submit() schedules callables asynchronously".split()
    pieces = tok.encode_words(words)
    assert sum(pieces, []) == tok.encode(" ".join(words))
    assert [tok.decode(p).strip() for p in pieces] == words
    assert tok.token_text(tok.encode(" the")[0]) == "the" and tok.token_text(tok.mask_id) == "<mask>"


def test_a_directory_of_neither_kind_is_a_one_line_error(tmp_path, capsys, hf_dirs):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "spm.model" in message and "tokenizer.json" in message and "sentencepiece.bpe.model" in message
    assert data_cli(["shards", "--tokenizer", str(tmp_path), "--out", str(tmp_path / "s"), str(tmp_path)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and str(tmp_path) in err_lines[0] and "tokenizer.json" in err_lines[0]
    # A tokenizer.json of another family (WordPiece, no Ġ or ▁ words) is refused by name.
    spec = json.loads((hf_dirs["byte_bpe"] / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    spec["decoder"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"without byte-level or Metaspace pre-tokenization; expected an HF RoBERTa"):
        load_tokenizer(tmp_path)
    # A file linked out of its directory is not read.
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").symlink_to(hf_dirs["byte_bpe"] / "tokenizer.json")
    with pytest.raises(DataError, match=r"^\S+/tokenizer.json is a symbolic link out of its directory \(to "):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer.json: not JSON \(Expecting"):
        load_tokenizer(tmp_path)
