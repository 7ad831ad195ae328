"""Shard writing and reading: exact contents, manifest, resume after interruption, bad shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_fixtures import corpus_docs, corpus_file, shard_dir, tok, tokenizer_dir  # noqa: F401
from data_pipelines.errors import DataError, SkipReport
from data_pipelines.shards import HEADER_KEY, load_manifest, write_shards
from data_pipelines.stream import iter_shard
from data_pipelines.tokenizer import train_tokenizer


def _read_split(directory: Path, split: str, tok) -> list[np.ndarray]:
    manifest = load_manifest(directory)
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        docs.extend(iter_shard(str(directory / shard["name"]), expected_hash=tok.hash, vocab_size=tok.vocab_size,
                               on_error="raise", report=SkipReport()))
    return docs


def test_shards_hold_exactly_the_tokenized_documents(shard_dir, tok, corpus_docs):
    manifest = load_manifest(shard_dir)
    assert manifest["tokenizer_hash"] == tok.hash and manifest["dtype"] == "u16"
    train, valid = _read_split(shard_dir, "train", tok), _read_split(shard_dir, "valid", tok)
    assert all(d.dtype == np.uint16 for d in train)
    expected = tok.encode_batch(corpus_docs)
    # Splits are disjoint and together hold every document once, each in corpus order.
    assert len(train) + len(valid) == len(expected)
    assert 0.02 < len(valid) / len(expected) < 0.1
    merged = sorted([d.tolist() for d in train + valid])
    assert merged == sorted(expected)
    train_lists = [d.tolist() for d in train]
    assert train_lists == [e for e in expected if e in train_lists]
    for split, docs in (("train", train), ("valid", valid)):
        info = manifest["splits"][split]
        assert info["num_docs"] == len(docs) == sum(s["num_docs"] for s in info["shards"])
        assert info["num_tokens"] == sum(map(len, docs)) == sum(s["num_tokens"] for s in info["shards"])
        assert info["num_shards"] == len(info["shards"]) == len(list(shard_dir.glob(f"{split}-*.tar")))
    assert manifest["skipped"]["total"] == 0


def test_shards_are_plain_webdataset_without_pickles(shard_dir):
    first = sorted(shard_dir.glob("train-*.tar"))[0]
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert names[0] == f"{HEADER_KEY}.json"
    assert {n.split(".", 1)[1] for n in names[1:]} == {"u16"}  # raw ids only, nothing unpickled
    samples = list(wds.WebDataset(str(first), shardshuffle=False))
    assert len(samples) == 101 and samples[1]["__key__"] == "0000000000"


def test_rerun_skips_complete_shards_and_rewrites_missing(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "s"
    first = write_shards(corpus_file, tokenizer_dir, out, docs_per_shard=200, num_workers=0, progress=False)
    shards = sorted(out.glob("train-*.tar"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    original = shards[2].read_bytes()
    shards[2].unlink()
    second = write_shards(corpus_file, tokenizer_dir, out, docs_per_shard=200, num_workers=0, progress=False)
    assert second["splits"] == first["splits"]
    assert shards[2].read_bytes() == original  # rewritten byte-identically
    for p in shards:
        if p != shards[2]:
            assert p.stat().st_mtime_ns == stamps[p.name], f"{p.name} was rewritten"
    with pytest.raises(DataError, match="other settings"):
        write_shards(corpus_file, tokenizer_dir, out, docs_per_shard=100, num_workers=0, progress=False)


def test_interrupted_run_leaves_no_valid_looking_shard_and_resumes(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "s"
    # A real interruption in the middle of writing a shard: the file-size limit kills the
    # process (SIGXFSZ) once a shard file grows past 60 kB; shards are ~200 kB.
    script = textwrap.dedent(f"""
        import resource
        from data_pipelines.shards import write_shards
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        write_shards({str(corpus_file)!r}, {str(tokenizer_dir)!r}, {str(out)!r}, docs_per_shard=200, num_workers=0, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], capture_output=True)
    assert proc.returncode != 0
    leftovers = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".partial") for n in leftovers), leftovers
    assert not any(n.endswith(".tar") for n in leftovers) and "manifest.json" not in leftovers
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(out)
    manifest = write_shards(corpus_file, tokenizer_dir, out, docs_per_shard=200, num_workers=0, progress=False)
    assert not list(out.glob("*.partial"))
    clean = write_shards(corpus_file, tokenizer_dir, tmp_path / "clean", docs_per_shard=200, num_workers=0, progress=False)
    assert manifest["splits"] == clean["splits"]
    for p in (tmp_path / "clean").glob("*.tar"):
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_parallel_and_serial_writers_agree(tmp_path, corpus_file, tokenizer_dir):
    a = write_shards(corpus_file, tokenizer_dir, tmp_path / "a", docs_per_shard=300, num_workers=0, progress=False)
    b = write_shards(corpus_file, tokenizer_dir, tmp_path / "b", docs_per_shard=300, num_workers=2, progress=False)
    assert a["splits"] == b["splits"]


def test_skipped_inputs_are_listed_in_the_manifest(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "a fine document"}\n{"text": oops}\n{"text": ""}\n')
    manifest = write_shards(tmp_path / "in", tokenizer_dir, tmp_path / "s", on_error="skip", num_workers=0, progress=False)
    assert manifest["skipped"]["counts"] == {"bad_json": 1, "empty_document": 1}
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["skipped"]["total"] == 2
    assert manifest["splits"]["train"]["num_docs"] == 1


# -- bad shards ------------------------------------------------------------------------------


def _copy_shard(shard_dir: Path, tmp_path: Path) -> Path:
    src = sorted(shard_dir.glob("train-*.tar"))[0]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


def _read(path, tok, on_error="raise", report=None):
    return list(iter_shard(str(path), expected_hash=tok.hash, vocab_size=tok.vocab_size, on_error=on_error,
                           report=report if report is not None else SkipReport()))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # ends inside a member


def _truncate_at_member(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: (len(data) // 2) // 512 * 512 // 1024 * 1024])  # a clean cut between members


def _corrupt_header(path: Path) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[5].offset
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF  # a byte of a member header's name: the checksum no longer matches
    path.write_bytes(bytes(data))


def _write_custom(path: Path, tok, samples: list[tuple[str, bytes]], num_docs: int | None = None) -> None:
    header = {"format": 1, "tokenizer_hash": tok.hash, "dtype": "u16", "num_docs": num_docs if num_docs is not None else len(samples)}
    with open(path, "wb") as fh, wds.TarWriter(fh, encoder=False) as w:
        w.write({"__key__": HEADER_KEY, "json": json.dumps(header).encode()})
        for key, data in samples:
            w.write({"__key__": key, "u16": data})


@pytest.mark.parametrize("damage", ["truncated", "truncated_at_member", "corrupt_header"])
def test_damaged_tar_is_named_or_counted(shard_dir, tok, tmp_path, damage):
    path = _copy_shard(shard_dir, tmp_path)
    {"truncated": _truncate, "truncated_at_member": _truncate_at_member, "corrupt_header": _corrupt_header}[damage](path)
    with pytest.raises(DataError) as err:
        _read(path, tok)
    assert path.name in str(err.value) and "\n" not in str(err.value)
    report = SkipReport()
    docs = _read(path, tok, on_error="skip", report=report)
    assert report.counts == {"bad_shard": 1} and len(docs) < 100


def test_bad_arrays_are_named(tok, tmp_path):
    odd = tmp_path / "odd.tar"
    _write_custom(odd, tok, [("0000000000", np.arange(5, 10, dtype="<u2").tobytes()), ("0000000001", b"\x01\x02\x03")])
    with pytest.raises(DataError, match=r"odd.tar: sample 0000000001 has no valid u16"):
        _read(odd, tok)
    big = tmp_path / "big.tar"
    _write_custom(big, tok, [("0000000000", np.array([5, 60000], dtype="<u2").tobytes())])
    with pytest.raises(DataError, match=r"big.tar: sample 0000000000 has ids outside"):
        _read(big, tok)
    headless = tmp_path / "headless.tar"
    with open(headless, "wb") as fh, wds.TarWriter(fh, encoder=False) as w:
        w.write({"__key__": "0000000000", "u16": np.arange(5, 9, dtype="<u2").tobytes()})
    with pytest.raises(DataError, match="headless.tar: not a roberta-pl shard"):
        _read(headless, tok)


def test_missing_shard_is_named(tok, tmp_path):
    with pytest.raises(DataError, match="gone-000000.tar"):
        _read(tmp_path / "gone-000000.tar", tok)
    report = SkipReport()
    assert _read(tmp_path / "gone-000000.tar", tok, on_error="skip", report=report) == []
    assert report.total == 1


def test_shard_from_another_tokenizer_is_refused(tmp_path, corpus_file, tok):
    other = train_tokenizer(corpus_file, tmp_path / "other_tok", vocab_size=400, input_sentence_size=5000)
    write_shards(corpus_file, other.path, tmp_path / "other", docs_per_shard=500, num_workers=0, progress=False)
    shard = sorted((tmp_path / "other").glob("train-*.tar"))[0]
    with pytest.raises(DataError, match=f"{shard.name}: written with tokenizer {other.hash}"):
        _read(shard, tok)
