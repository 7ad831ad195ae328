"""Corpus readers: formats, document boundaries, every bad input, and the embedded default corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import sysconfig
from pathlib import Path

import pytest

from data_pipelines import corpus as corpus_mod
from data_pipelines.corpus import build_default_corpus, default_corpus, iter_documents
from data_pipelines.errors import DataError, SkipReport


def _docs(*args, **kw):
    return list(iter_documents(*args, **kw))


def test_text_documents_are_separated_by_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\nsame doc\n\n\n  \nsecond doc\n\nthird\n")
    assert _docs(f) == ["first line\nsame doc", "second doc", "third"]


def test_all_formats_dirs_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha\n\nbeta\n")
    with gzip.open(tmp_path / "d" / "sub" / "b.txt.gz", "wt") as fh:
        fh.write("gamma\n")
    (tmp_path / "d" / "c.jsonl").write_text(json.dumps({"body": "delta"}) + "\n\n" + json.dumps({"body": "eps"}) + "\n")
    with gzip.open(tmp_path / "d" / "sub" / "e.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "zeta", "other": 1}) + "\n")
    (tmp_path / "d" / "ignored.csv").write_text("not,read\n")
    # A directory is searched recursively, in sorted path order.
    assert _docs(tmp_path / "d", text_field="body") == ["alpha", "beta", "delta", "eps", "gamma", "zeta"]
    assert _docs(str(tmp_path / "d" / "**" / "*.gz"), text_field="body") == ["gamma", "zeta"]
    # Explicit files keep the order given and are not duplicated.
    assert _docs([tmp_path / "d" / "c.jsonl", tmp_path / "d" / "a.txt", tmp_path / "d" / "a.txt"], text_field="body") == [
        "delta", "eps", "alpha", "beta"]


def _bad(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


BAD_INPUTS = {
    # name: (file name, content, reason in the skip report, what the error names)
    "invalid_utf8": ("u.txt", b"good doc\n\nbad \xff\xfe here\nsame bad doc\n\nlast doc\n", "invalid_utf8", "u.txt:3"),
    "bad_json": ("j.jsonl", b'{"text": "good doc"}\n{"text": broken\n{"text": "last doc"}\n', "bad_json", "j.jsonl:2"),
    "empty_document": ("e.jsonl", b'{"text": "good doc"}\n{"text": "   "}\n{"text": "last doc"}\n', "empty_document", "e.jsonl:2"),
    "missing_field": ("m.jsonl", b'{"text": "good doc"}\n{"title": "x"}\n{"text": "last doc"}\n', "missing_text_field", "m.jsonl:2"),
    "enormous_line": ("l.txt", b"good doc\n\n" + b"x" * 5000 + b"\n\nlast doc\n", "line_too_long", "l.txt:3"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_file_and_line(tmp_path, case):
    name, content, _, where = BAD_INPUTS[case]
    path = _bad(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        _docs(path, max_line_bytes=1000)
    assert where in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_skip_is_counted_and_logged(tmp_path, case, caplog):
    name, content, reason, where = BAD_INPUTS[case]
    path = _bad(tmp_path, name, content)
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        docs = _docs(path, on_error="skip", report=report, max_line_bytes=1000)
    assert docs == ["good doc", "last doc"]  # only the bad document is gone, and it is counted
    assert report.counts == {reason: 1}
    assert where in report.to_dict()["examples"][reason][0]
    assert any(reason in r.getMessage() for r in caplog.records)


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="nope.txt: missing file"):
        _docs(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="matches no supported file"):
        _docs(str(tmp_path / "*.jsonl"))
    report = SkipReport()
    (tmp_path / "ok.txt").write_text("fine\n")
    assert _docs([tmp_path / "nope.txt", tmp_path / "ok.txt"], on_error="skip", report=report) == ["fine"]
    assert report.counts == {"missing_file": 1}


def test_truncated_gzip_is_reported(tmp_path):
    # Multi-line documents, so the cut can fall between lines of one document.
    data = gzip.compress(b"alpha beta\ngamma delta\nepsilon zeta eta\n\n" * 4000, mtime=0)
    path = _bad(tmp_path, "t.txt.gz", data[: len(data) // 2])
    with pytest.raises(DataError, match="t.txt.gz: unreadable file"):
        _docs(path)
    report = SkipReport()
    docs = _docs(path, on_error="skip", report=report)
    assert report.counts["unreadable_file"] == 1 and 0 < len(docs) < 4000
    assert set(docs) == {"alpha beta\ngamma delta\nepsilon zeta eta"}  # the document cut short is not passed on


def test_empty_file_is_reported(tmp_path):
    path = _bad(tmp_path, "empty.txt", b"\n \n")
    with pytest.raises(DataError, match="empty.txt: empty file"):
        _docs(path)


def test_unsupported_suffix_is_an_error(tmp_path):
    path = _bad(tmp_path, "data.csv", b"a,b\n")
    with pytest.raises(DataError, match="unsupported input type"):
        _docs(path)


def test_default_corpus_is_real_english_cached_and_deterministic(tmp_path, monkeypatch):
    a = build_default_corpus(tmp_path / "a.txt", target_bytes=100_000)
    b = build_default_corpus(tmp_path / "b.txt", target_bytes=100_000)
    assert a.read_bytes() == b.read_bytes()
    docs = _docs(a)
    assert len(docs) > 100 and sum(map(len, docs)) >= 100_000
    words = " ".join(docs).lower().split()
    assert words.count("the") > 0.02 * len(words)  # English prose, not code
    assert not any(line.lstrip().startswith(">>>") for d in docs for line in d.splitlines())
    # default_corpus() builds into $ROBERTA_PL_CACHE once, then reuses the file.
    monkeypatch.setenv("ROBERTA_PL_CACHE", str(tmp_path / "cache"))
    path = default_corpus(target_bytes=100_000)
    assert path.parent == tmp_path / "cache" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert default_corpus(target_bytes=100_000) == path and path.stat().st_mtime_ns == stamp
    assert path.read_bytes() == a.read_bytes()


def test_default_corpus_reads_only_the_stdlib_and_the_named_packages(tmp_path, monkeypatch):
    # A package that happens to be installed must not change the corpus: only the stdlib and
    # CORPUS_PACKAGES (in that order) are read. A fake site-packages holds one of each kind.
    stdlib = tmp_path / "stdlib"
    purelib = tmp_path / "site"
    doc = '"""{} is a module whose docstring is long enough to be kept as real English prose here."""\n'
    for where, text in ((stdlib / "alpha.py", "Alpha"), (purelib / "numpy" / "core.py", "Numpy"),
                        (purelib / "torch" / "nn.py", "Torch"), (purelib / "aardvark" / "x.py", "Aardvark"),
                        (purelib / "torch" / "tests" / "t.py", "Testing")):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(doc.format(text))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib), "purelib": str(purelib)})
    out = build_default_corpus(tmp_path / "c.txt", target_bytes=10_000)
    firsts = [d.split()[0] for d in _docs(out)]
    assert firsts == ["Alpha", "Torch", "Numpy"]  # stdlib, then torch before numpy; no stray package, no tests


@pytest.mark.slow
def test_default_corpus_matches_its_reference_hash():
    """The real default corpus (built once per test session) is the one the README's figures come from."""
    path = default_corpus()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    key = corpus_mod.corpus_key()
    assert path.name == f"default_corpus-v3-py{key[0]}-torch{key[1]}-6000k.txt"
    assert 5_900_000 < path.stat().st_size < 6_200_000
    if key in corpus_mod.REFERENCE_CORPUS_SHA256:  # the pair CI installs (Python 3.11.7, torch 2.13.0)
        assert digest == corpus_mod.REFERENCE_CORPUS_SHA256[key], "the default corpus changed: update the reference"
    # A corpus that differs from the reference for its versions is an error (never silently different figures).
    changed = path.with_name("changed.txt")
    changed.write_bytes(path.read_bytes()[:-10])
    monkeypatch_key = {**corpus_mod.REFERENCE_CORPUS_SHA256, key: digest}
    old, corpus_mod.REFERENCE_CORPUS_SHA256 = corpus_mod.REFERENCE_CORPUS_SHA256, monkeypatch_key
    try:
        with pytest.raises(DataError, match="would not be the README's"):
            corpus_mod._check_reference(changed, 6_000_000)
    finally:
        corpus_mod.REFERENCE_CORPUS_SHA256 = old
        Path(changed).unlink()


def test_files_with_other_suffixes_in_a_directory_are_counted_and_named(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("one document here\n")
    (tmp_path / "notes.md").write_text("# not read\n")
    (tmp_path / "table.csv").write_text("a,b\n")
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        docs = _docs(tmp_path, report=report, on_error="skip")
    assert docs == ["one document here"]
    assert report.counts["unsupported_suffix"] == 2
    assert "2 file(s) without a" in caplog.text and "notes.md" in caplog.text


def test_a_directory_of_files_without_a_suffix_says_to_rename_them(tmp_path):
    # Licence texts and manuals often have no suffix: skipping (--on-error skip) cannot help, renaming does.
    from data_pipelines.corpus import expand_inputs
    from data_pipelines.errors import DataError

    (tmp_path / "COPYING").write_text("GNU GENERAL PUBLIC LICENSE\n")
    with pytest.raises(DataError) as e:
        expand_inputs(str(tmp_path))
    message = str(e.value)
    assert str(tmp_path) in message and "rename" in message and "*.txt" in message
    assert "--on-error" not in message and "\n" not in message
