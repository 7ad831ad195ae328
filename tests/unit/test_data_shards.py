"""Shard writing and reading: exact contents, compact multi-document samples, stock WebDataset reading,
global shuffle, tasks (a job array's shares) and their merge, resume after interruption, bad shards."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_fixtures import (  # noqa: F401
    corpus_docs,
    corpus_file,
    shard_dir,
    tok,
    tokenizer_dir,
    write_corpus_dir,
)

from data_pipelines import shard_format
from data_pipelines.errors import DataError, SkipReport
from data_pipelines.manifest import TASKS_DIR, load_manifest, merge_manifests, task_record_name
from data_pipelines.shard_format import encode_sample, iter_shard
from data_pipelines.shards import default_num_shards, write_shards
from data_pipelines.tokenizer import train_tokenizer


def _read_split(directory: Path, split: str, tok) -> list[np.ndarray]:
    manifest = load_manifest(directory)
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        docs.extend(iter_shard(str(directory / shard["name"]), expected_hash=tok.hash, vocab_size=tok.vocab_size,
                               on_error="raise", report=SkipReport()))
    return docs


def _as_counter(docs) -> Counter:
    return Counter(tuple(np.asarray(d).tolist()) for d in docs)


def _tars(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def test_shards_hold_exactly_the_tokenized_documents(shard_dir, tok, corpus_docs):
    manifest = load_manifest(shard_dir)
    assert manifest["format"] == 2 and manifest["tokenizer_hash"] == tok.hash and manifest["dtype"] == "uint16"
    train, valid = _read_split(shard_dir, "train", tok), _read_split(shard_dir, "valid", tok)
    assert all(d.dtype == np.uint16 for d in train)
    expected = tok.encode_batch(corpus_docs)
    # Splits are disjoint and together hold every document once.
    assert len(train) + len(valid) == len(expected)
    assert 0.02 < len(valid) / len(expected) < 0.1
    assert _as_counter(train) + _as_counter(valid) == _as_counter(expected)
    # ... but not in corpus order: documents are dealt to shards at random and shuffled in each shard.
    position = {tuple(e): i for i, e in enumerate(expected)}
    first_shard = [position[tuple(d.tolist())] for d in _read_split(shard_dir, "train", tok)[:50]]
    assert first_shard != sorted(first_shard)
    for split, docs in (("train", train), ("valid", valid)):
        info = manifest["splits"][split]
        assert info["num_docs"] == len(docs) == sum(s["num_docs"] for s in info["shards"])
        assert info["num_tokens"] == sum(map(len, docs)) == sum(s["num_tokens"] for s in info["shards"])
        assert info["num_shards"] == len(info["shards"]) == len(list(shard_dir.glob(f"{split}-*.tar")))
        assert info["num_bytes"] == sum((shard_dir / s["name"]).stat().st_size for s in info["shards"])
    # Dealt round-robin after a random permutation: shards hold equal numbers of documents (±1 per chunk).
    counts = [s["num_docs"] for s in manifest["splits"]["train"]["shards"]]
    assert max(counts) - min(counts) <= 2, counts
    assert manifest["skipped"]["total"] == 0


def test_compact_samples_take_at_most_2_2_bytes_per_token(tmp_path, corpus_file, tok):
    # The shard count chosen from the input size (one shard for this 300 kB corpus), so the figure is what a
    # user gets: ids (2 bytes), offsets (4 bytes a document) and tar headers.
    manifest = write_shards(corpus_file, tok.path, tmp_path / "s", num_workers=0, progress=False)
    tokens = manifest["splits"]["train"]["num_tokens"]
    size = sum(p.stat().st_size for p in (tmp_path / "s").glob("train-*.tar"))
    assert size / tokens <= 2.2, size / tokens
    assert manifest["splits"]["train"]["bytes_per_token"] == round(size / tokens, 4)


def test_stock_webdataset_reads_every_document(shard_dir, tok, corpus_docs):
    urls = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    with tarfile.open(urls[0]) as tar:
        members = tar.getnames()
    assert {n.split(".", 1)[1] for n in members} == {"json", "ids.npy", "offsets.npy"}  # nothing a pickle could hide in
    # The few lines docs/data.md gives any WebDataset user:
    docs = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        ids, offsets = sample["ids.npy"], sample["offsets.npy"]
        docs.extend(np.split(ids, offsets[1:-1]) if len(offsets) > 1 else [])
        assert sample["json"]["tokenizer_hash"] == tok.hash and sample["json"]["dtype"] == "uint16"
    assert _as_counter(docs) == _as_counter(tok.encode_batch(corpus_docs))


def test_big_shards_are_cut_into_samples_and_read_back(tmp_path, corpus_file, tok, monkeypatch):
    monkeypatch.setattr(shard_format, "SAMPLE_BYTES", 4096)  # ~2k tokens a sample: many samples per shard
    manifest = write_shards(corpus_file, tok.path, tmp_path / "s", num_shards=2, num_workers=0, progress=False)
    shard = tmp_path / "s" / manifest["splits"]["train"]["shards"][0]["name"]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False).decode())
    assert len(samples) > 10
    assert [s["json"]["sample"] for s in samples] == list(range(len(samples)))
    assert all(s["json"]["samples"] == len(samples) for s in samples)
    assert all(s["json"]["num_tokens"] >= 2048 for s in samples[:-1])  # whole documents, at least the target
    docs = list(iter_shard(str(shard), expected_hash=tok.hash, vocab_size=tok.vocab_size, on_error="raise", report=SkipReport()))
    assert len(docs) == manifest["splits"]["train"]["shards"][0]["num_docs"]


def test_two_sources_in_order_are_mixed_in_every_shard(tmp_path, tok, corpus_docs):
    # A corpus sorted by source: the first half lower case ("A"), the second upper case ("B").
    half = len(corpus_docs) // 2
    docs = [d.lower() for d in corpus_docs[:half]] + [d.upper() for d in corpus_docs[half:]]
    write_shards(None, tok.path, tmp_path / "s", documents=docs, num_shards=4, num_workers=0, progress=False)
    source = {tuple(ids): i >= half for i, ids in enumerate(tok.encode_batch(docs))}
    for path in sorted((tmp_path / "s").glob("train-*.tar")):
        order = [source[tuple(d.tolist())] for d in iter_shard(str(path), expected_hash=None, vocab_size=None, on_error="raise", report=SkipReport())]
        assert 0.35 < np.mean(order) < 0.65, path.name  # each shard holds both sources in about equal parts...
        assert 0 < np.mean(order[:20]) < 1, path.name  # ... shuffled together from its first documents on


def test_rerun_skips_complete_shards_and_rewrites_missing(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "s"
    first = write_shards(corpus_file, tokenizer_dir, out, num_shards=5, num_workers=0, progress=False)
    shards = sorted(out.glob("train-*.tar"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    original = shards[2].read_bytes()
    shards[2].unlink()
    second = write_shards(corpus_file, tokenizer_dir, out, num_shards=5, num_workers=0, progress=False)
    assert second["splits"] == first["splits"]
    assert shards[2].read_bytes() == original  # rewritten byte-identically
    for p in shards:
        if p != shards[2]:
            assert p.stat().st_mtime_ns == stamps[p.name], f"{p.name} was rewritten"
    with pytest.raises(DataError, match=r"other settings \(.*num_shards"):
        write_shards(corpus_file, tokenizer_dir, out, num_shards=4, num_workers=0, progress=False)


KILLERS = {
    # The file-size limit kills the process (SIGXFSZ) once a file grows past 60 kB: here the per-shard spill
    # of tokenized documents (each of the 2 shards is ~120 kB).
    "while_spilling": "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))",
    # SIGKILL in the middle of writing the first shard's tar (its 4th sample of ~30).
    "while_writing_a_shard": textwrap.dedent("""
        import os, signal, webdataset as wds
        from data_pipelines import shard_format
        shard_format.SAMPLE_BYTES = 4096
        write = wds.TarWriter.write
        calls = []
        def dying_write(self, obj):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return write(self, obj)
        wds.TarWriter.write = dying_write
    """),
}


@pytest.mark.parametrize("when", list(KILLERS))
def test_interrupted_run_leaves_no_valid_looking_shard_and_resumes(tmp_path, corpus_file, tokenizer_dir, when):
    out = tmp_path / "s"
    script = KILLERS[when] + textwrap.dedent(f"""
        from data_pipelines.shards import write_shards
        write_shards({str(corpus_file)!r}, {str(tokenizer_dir)!r}, {str(out)!r}, num_shards=2, num_workers=0, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], capture_output=True)
    assert proc.returncode != 0
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = ".partial" if when == "while_writing_a_shard" else ".ids"
    assert any(n.endswith(expected) for n in leftovers), leftovers
    assert not any(n.endswith(".tar") for n in leftovers) and "manifest.json" not in leftovers
    with pytest.raises(DataError, match="no manifest yet: 1 of 1 tasks have not finished"):
        load_manifest(out)
    manifest = write_shards(corpus_file, tokenizer_dir, out, num_shards=2, num_workers=0, progress=False)
    assert not list(out.rglob("*.partial")) and not list((out / TASKS_DIR).glob("*.tmp"))
    clean = write_shards(corpus_file, tokenizer_dir, tmp_path / "clean", num_shards=2, num_workers=0, progress=False)
    assert manifest["splits"] == clean["splits"]
    assert _tars(out) == _tars(tmp_path / "clean")


def test_rerun_with_other_documents_or_files_is_refused(tmp_path, tok, corpus_docs):
    write_shards(None, tok.path, tmp_path / "a", documents=corpus_docs[:50], num_shards=1, num_workers=0, progress=False)
    edited = corpus_docs[:49] + [corpus_docs[49] + " (edited)"]  # as many documents, one changed
    with pytest.raises(DataError, match=r"other settings \(inputs\)"):
        write_shards(None, tok.path, tmp_path / "a", documents=edited, num_shards=1, num_workers=0, progress=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(corpus_docs[:50]))
    write_shards(corpus, tok.path, tmp_path / "b", num_shards=1, num_workers=0, progress=False)
    corpus.write_text("\n\n".join(corpus_docs[:51]))
    with pytest.raises(DataError, match=r"other settings \(inputs\)"):
        write_shards(corpus, tok.path, tmp_path / "b", num_shards=1, num_workers=0, progress=False)


def test_parallel_and_serial_writers_agree(tmp_path, corpus_file, tokenizer_dir):
    a = write_shards(corpus_file, tokenizer_dir, tmp_path / "a", num_shards=3, num_workers=0, progress=False)
    b = write_shards(corpus_file, tokenizer_dir, tmp_path / "b", num_shards=3, num_workers=2, progress=False)
    assert a["splits"] == b["splits"]
    assert _tars(tmp_path / "a") == _tars(tmp_path / "b")



def test_tasks_write_what_one_process_writes_and_a_failed_task_reruns_alone(tmp_path, corpus_docs, tokenizer_dir, tok):
    corpus = write_corpus_dir(tmp_path, corpus_docs)
    kw = dict(num_shards=6, valid_fraction=0.1, num_workers=0, progress=False)
    # The job array's way: each task on its own (here one after the other), the last one merges.
    array = tmp_path / "array"
    record = write_shards(corpus, tokenizer_dir, array, num_tasks=2, task_index=1, **kw)
    assert record["task"] == 1 and not (array / "manifest.json").exists()
    with pytest.raises(DataError, match=r"1 of 2 tasks have not finished \(task 0\)"):
        merge_manifests(array)
    merged = write_shards(corpus, tokenizer_dir, array, num_tasks=2, task_index=0, **kw)
    assert json.loads((array / "manifest.json").read_text())["splits"] == merged["splits"]
    # One process running both tasks writes the very same shards.
    together = write_shards(corpus, tokenizer_dir, tmp_path / "together", num_tasks=2, **kw)
    assert together["splits"] == merged["splits"] and _tars(array) == _tars(tmp_path / "together")
    # One process with one task: the same documents in each split, the same tokens (another layout).
    single = write_shards(corpus, tokenizer_dir, tmp_path / "single", **kw)
    for split in ("train", "valid"):
        assert single["splits"][split]["num_tokens"] == merged["splits"][split]["num_tokens"]
        assert _as_counter(_read_split(tmp_path / "single", split, tok)) == _as_counter(_read_split(array, split, tok))
    # Task 1 fails half-way (its record and one of its shards gone): rerunning it rewrites only its shards.
    task1 = [s["name"] for s in json.loads((array / TASKS_DIR / task_record_name(1, 2)).read_text())["splits"]["train"]]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in array.glob("*.tar")}
    (array / TASKS_DIR / task_record_name(1, 2)).unlink()
    (array / task1[0]).unlink()
    (array / "manifest.json").unlink()
    assert write_shards(corpus, tokenizer_dir, array, num_tasks=2, task_index=1, **kw)["splits"] == merged["splits"]
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in array.glob("*.tar")}
    assert {n: b for n, (_, b) in after.items()} == {n: b for n, (_, b) in before.items()}
    assert [n for n in before if after[n][0] != before[n][0]] == [task1[0]]
    # A task count the files cannot feed is refused in one line.
    with pytest.raises(DataError, match="5 tasks for 4 input file"):
        write_shards(corpus, tokenizer_dir, tmp_path / "five", num_tasks=5, **kw)


def test_shard_count_follows_the_corpus_size(tmp_path, corpus_file, tokenizer_dir, caplog):
    assert default_num_shards(100_000) == 1
    assert default_num_shards(4e6) == 15  # ~2 MB of ids in shards of at least 128 KiB
    assert default_num_shards(1e9) == 64  # enough for 64 readers
    assert default_num_shards(1e12) == math_ceil(1e12 / 4 * 2 / (128 << 20))  # at most 128 MiB a shard
    with caplog.at_level(logging.INFO, logger="data_pipelines"):
        manifest = write_shards(corpus_file, tokenizer_dir, tmp_path / "s", num_workers=0, progress=False)
    assert manifest["splits"]["train"]["num_shards"] == 1
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "chosen from the input size" in text and "pass --num-shards N" in text


def math_ceil(x: float) -> int:
    return int(-(-x // 1))


def test_skipped_inputs_are_listed_in_the_manifest(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "a fine document"}\n{"text": oops}\n{"text": ""}\n')
    manifest = write_shards([tmp_path / "in", tmp_path / "gone.txt"], tokenizer_dir, tmp_path / "s", on_error="skip",
                            num_workers=0, progress=False)
    assert manifest["skipped"]["counts"] == {"bad_json": 1, "empty_document": 1, "missing_file": 1}
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["skipped"]["total"] == 3
    assert manifest["splits"]["train"]["num_docs"] == 1


# -- bad shards ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_samples(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    """One shard of ~30 samples (samples of 4 kB instead of 1 MiB)."""
    out = tmp_path_factory.mktemp("many") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shard_format, "SAMPLE_BYTES", 4096)
        write_shards(corpus_file, tokenizer_dir, out, num_shards=2, num_workers=0, progress=False)
    return sorted(out.glob("train-*.tar"))[0]


def _read(path, tok, on_error="raise", report=None):
    return list(iter_shard(str(path), expected_hash=tok.hash, vocab_size=tok.vocab_size, on_error=on_error,
                           report=report if report is not None else SkipReport()))


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # ends inside a member


def _truncate_at_sample(path: Path) -> None:
    members = _members(path)
    first_of_sample_5 = next(m for m in members if m.name.endswith("-00005.ids.npy"))
    path.write_bytes(path.read_bytes()[: first_of_sample_5.offset])  # a clean cut between samples


def _truncate_in_sample(path: Path) -> None:
    members = _members(path)
    json_of_sample_5 = next(m for m in members if m.name.endswith("-00005.json"))
    path.write_bytes(path.read_bytes()[: json_of_sample_5.offset])  # between members of one sample


def _corrupt_header(path: Path) -> None:
    offset = _members(path)[7].offset
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF  # a byte of a member header's name: the checksum no longer matches
    path.write_bytes(bytes(data))


def _flip_id(path: Path) -> None:
    member = next(m for m in _members(path) if m.name.endswith("-00003.ids.npy"))
    data = bytearray(path.read_bytes())
    data[member.offset_data + 200] ^= 0x01  # one id changes, still in range: only the CRC sees it
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "truncated_at_sample": _truncate_at_sample, "truncated_in_sample": _truncate_in_sample,
          "corrupt_header": _corrupt_header, "flipped_id": _flip_id}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_tar_is_named_or_counted(many_samples, tok, tmp_path, damage):
    path = tmp_path / many_samples.name
    shutil.copy(many_samples, path)
    total = len(_read(path, tok))
    DAMAGE[damage](path)
    with pytest.raises(DataError) as err:
        _read(path, tok)
    assert path.name in str(err.value) and "\n" not in str(err.value)
    report = SkipReport()
    docs = _read(path, tok, on_error="skip", report=report)
    assert report.counts == {"bad_shard": 1} and len(docs) < total


def _write_samples(path: Path, samples: list[dict]) -> None:
    with open(path, "wb") as fh, wds.TarWriter(fh, encoder=False) as w:
        for s in samples:
            w.write(s)


def _sample(tok, ids, i=0, n=1, **meta) -> dict:
    ids = np.asarray(ids, dtype="<u2")
    return encode_sample(f"x-{i:05d}", ids, np.array([0, len(ids)], dtype="<u4"),
                         {"tokenizer_hash": tok.hash, "shard": "x.tar", "sample": i, "samples": n, **meta})


def test_bad_arrays_are_named(tok, tmp_path):
    cases = {
        "odd": (lambda s: s | {"ids.npy": s["ids.npy"][:-1]}, r"odd.tar: sample x-00000: ids.npy holds 9 bytes"),
        "big": (lambda s: _sample(tok, [5, 60000]), r"big.tar: sample x-00000: has ids outside"),
        "headless": (lambda s: {k: v for k, v in s.items() if k != "json"}, "headless.tar: sample x-00000: incomplete"),
        "foreign": (lambda s: {"__key__": "a", "txt": b"some other dataset"}, "foreign.tar: not a roberta-pl shard"),
        "crc": (lambda s: s | {"json": s["json"].replace(b'"crc32": ', b'"crc32": 1')}, "crc.tar: sample x-00000: ids do not match"),
        "offsets": (lambda s: s | {"offsets.npy": shard_format._npy_bytes(np.array([0, 3], dtype="<u4"))}, "offsets.tar: .*offsets.npy is not"),
        "pickle": (lambda s: s | {"ids.npy": _pickled_npy()}, r"pickle.tar: sample x-00000: ids.npy is \|O"),
        "order": (lambda s: _sample(tok, [5, 6], i=1, n=2), r"order.tar: sample x-00001: is sample 1 of the shard, expected 0"),
    }
    for name, (damage, message) in cases.items():
        path = tmp_path / f"{name}.tar"
        _write_samples(path, [damage(_sample(tok, [5, 6, 7, 8, 9]))])
        with pytest.raises(DataError, match=message):
            _read(path, tok)


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_format_1_shards_and_manifests_are_refused_in_one_line(tok, tmp_path):
    old = tmp_path / "old" / "train-000000.tar"
    old.parent.mkdir()
    with open(old, "wb") as fh, wds.TarWriter(fh, encoder=False) as w:
        w.write({"__key__": "_shard", "json": json.dumps({"format": 1, "tokenizer_hash": tok.hash, "dtype": "u16", "num_docs": 1}).encode()})
        w.write({"__key__": "0000000000", "u16": np.arange(5, 9, dtype="<u2").tobytes()})
    with pytest.raises(DataError) as err:
        _read(old, tok)
    message = str(err.value)
    assert "train-000000.tar: written in shard format 1" in message and "roberta-pl-data shards" in message and "\n" not in message
    (old.parent / "manifest.json").write_text(json.dumps({"format": 1, "splits": {}}))
    with pytest.raises(DataError, match="old: written in shard format 1 .*roberta-pl-data shards"):
        load_manifest(old.parent)


def test_missing_shard_is_named(tok, tmp_path):
    with pytest.raises(DataError, match="gone-000000.tar"):
        _read(tmp_path / "gone-000000.tar", tok)
    report = SkipReport()
    assert _read(tmp_path / "gone-000000.tar", tok, on_error="skip", report=report) == []
    assert report.total == 1


def test_shard_from_another_tokenizer_is_refused(tmp_path, corpus_file, tok):
    other = train_tokenizer(corpus_file, tmp_path / "other_tok", vocab_size=400, input_sentence_size=5000)
    write_shards(corpus_file, other.path, tmp_path / "other", num_shards=2, num_workers=0, progress=False)
    shard = sorted((tmp_path / "other").glob("train-*.tar"))[0]
    with pytest.raises(DataError, match=f"{shard.name}: written with tokenizer {other.hash}"):
        _read(shard, tok)
