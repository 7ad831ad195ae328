"""Streaming corpus readers and the embedded default corpus.

Inputs are files, directories (searched recursively) and globs of ``.txt``, ``.txt.gz``,
``.jsonl`` and ``.jsonl.gz``. In text files a document is a run of non-blank lines; blank lines
separate documents. In JSON-lines files each line is an object whose ``text_field`` holds one
document. Everything streams line by line, so a corpus larger than RAM is fine.

The special input ``"@default"`` (or no input at all, in the CLI) is the embedded default corpus:
docstrings of the Python standard library, then of torch (a dependency, so always there), read with
:mod:`ast`, in a fixed order: never whatever else happens to be installed. It is real English prose,
already on every machine, the same for the same Python version (patch releases included) and torch release,
built once into the cache directory (``$ROBERTA_PL_CACHE``, default ``~/.cache/roberta-pl``) under a name that
says both, with its sha256 recorded beside it and checked at every use, and never downloaded.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_pipelines.errors import DataError, OnError, SkipReport, check_on_error

log = logging.getLogger("data_pipelines")

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
DEFAULT_CORPUS = "@default"
# A "line" longer than this is almost always a binary file or a minified dump, not prose; reading
# it whole would also defeat streaming. 1 MiB is far above any natural paragraph.
MAX_LINE_BYTES = 1 << 20

_GLOB_CHARS = re.compile(r"[*?\[]")


def cache_dir() -> Path:
    """The roberta-pl cache directory: ``$ROBERTA_PL_CACHE`` or ``~/.cache/roberta-pl``."""
    return Path(os.environ.get("ROBERTA_PL_CACHE") or Path.home() / ".cache" / "roberta-pl")


def _is_supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def expand_inputs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[Path]:
    """Resolve files, directories, globs and ``@default`` into an ordered list of files.

    Args:
        inputs: one input or a list of them. Directories are searched recursively for supported
            suffixes; globs are expanded; order is sorted within each input and kept across inputs.
        on_error: ``"raise"`` for a missing input, or ``"skip"`` to count it in ``report``.
        report: where skips are counted (a fresh one when ``None``).

    Returns:
        Existing files with a supported suffix, without duplicates.
    """
    check_on_error(on_error)
    report = report if report is not None else SkipReport()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        if text == DEFAULT_CORPUS:
            files.append(default_corpus())
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            every = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            found = [p for p in every if _is_supported(p)]
            if not found:
                report.handle(on_error, "no_input_files", str(path), f"no {'/'.join(SUFFIXES)} files inside",
                              fix=f"only files named *{', *'.join(SUFFIXES)} are read: rename the text files")
            others = [p for p in every if not _is_supported(p)]
            if others:  # a README or a .csv beside the text: not read, but counted and said once per directory
                report.counts["unsupported_suffix"] += len(others)
                report.examples.setdefault("unsupported_suffix", []).extend(str(o) for o in others[:3])
                log.warning("%s: %d file(s) without a %s suffix not read, e.g. %s", path, len(others),
                            "/".join(SUFFIXES), others[0].name)
            files.extend(found)
        elif _GLOB_CHARS.search(text):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            found = [p for p in found if p.is_file() and _is_supported(p)]
            if not found:
                report.handle(on_error, "no_input_files", text, "the glob matches no supported file")
            files.extend(found)
        elif not path.exists():
            report.handle(on_error, "missing_file", str(path), "no such file or directory")
        elif not _is_supported(path):
            raise DataError(f"{path}: unsupported input type; expected one of {', '.join(SUFFIXES)}")
        else:
            files.append(path)
    seen: set[Path] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _raw_lines(path: Path, max_line_bytes: int, on_error: OnError, report: SkipReport) -> Iterator[tuple[int, str | None]]:
    """Yield ``(line_number, text)``; text is ``None`` for a line that was skipped as bad.

    Decoding happens per line so an invalid byte is reported with its line number.
    """
    try:
        with _open_binary(path) as fh:
            lineno = 0
            while True:
                raw = fh.readline(max_line_bytes + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    # Drain the rest of the line in bounded chunks before deciding.
                    while True:
                        chunk = fh.readline(max_line_bytes)
                        if not chunk or chunk.endswith(b"\n"):
                            break
                    report.handle(on_error, "line_too_long", f"{path}:{lineno}", f"longer than {max_line_bytes} bytes")
                    yield lineno, None
                    continue
                nul = raw.find(b"\0")
                if nul >= 0:
                    # NUL is valid UTF-8 but never prose: a binary (or UTF-16) file named .txt. Its "text" would be one
                    # giant document of junk tokens, so the rest of the file is dropped with the document it cut.
                    report.handle(on_error, "binary_content", f"{path}:{lineno}",
                                  f"NUL byte at byte {nul} of the line, as in a binary or UTF-16 file"
                                  + ("; the rest of the file is skipped" if on_error == "skip" else ""))
                    yield lineno, None
                    return
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    report.handle(on_error, "invalid_utf8", f"{path}:{lineno}", f"byte {exc.start}: {exc.reason}")
                    yield lineno, None
    except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip, unreadable file
        report.handle(on_error, "unreadable_file", str(path), f"{type(exc).__name__}: {exc}")
        yield -1, None  # the document being read when the file broke is incomplete: drop it


def _text_documents(path: Path, max_line_bytes: int, on_error: OnError, report: SkipReport) -> Iterator[str]:
    lines: list[str] = []
    bad = False  # a skipped line poisons its document: a half document would be a silent loss
    for lineno, line in _raw_lines(path, max_line_bytes, on_error, report):
        if line is None:
            bad = True
            continue
        if line.strip():
            lines.append(line.rstrip("\r\n"))
            continue
        if lines and not bad:
            yield "\n".join(lines).strip()
        lines, bad = [], False
    if lines and not bad:
        yield "\n".join(lines).strip()


def _jsonl_documents(
    path: Path, text_field: str, max_line_bytes: int, on_error: OnError, report: SkipReport
) -> Iterator[str]:
    for lineno, line in _raw_lines(path, max_line_bytes, on_error, report):
        if line is None or not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report.handle(on_error, "bad_json", where, f"{exc.msg.removesuffix(' at')} at column {exc.colno}")
            continue
        if not isinstance(record, dict) or text_field not in record:
            report.handle(on_error, "missing_text_field", where, f"no {text_field!r} key")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            report.handle(on_error, "bad_text_field", where, f"{text_field!r} is {type(text).__name__}, not a string")
            continue
        if "\0" in text:  # an escaped \u0000 in JSON: binary data stored as text
            report.handle(on_error, "binary_content", where, f"NUL character at position {text.index(chr(0))} of "
                                                             f"{text_field!r}")
            continue
        if not text.strip():
            report.handle(on_error, "empty_document", where)
            continue
        yield text.strip()


def iter_documents(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    text_field: str = "text",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[str]:
    """Stream documents from files, directories, globs or ``@default``.

    Args:
        inputs: what :func:`expand_inputs` accepts.
        text_field: the key holding the text in ``.jsonl`` records.
        on_error: ``"raise"`` stops at the first bad input with a :class:`DataError` naming the
            file and line; ``"skip"`` drops the bad document/file and counts it in ``report``.
        report: the :class:`SkipReport` to count skips in (pass one to read the counts after).
        max_line_bytes: lines longer than this are bad input.

    Returns:
        An iterator of non-empty document strings, stripped of surrounding whitespace (it carries
        no meaning for MLM, and SentencePiece and HuggingFace disagree about a leading space), in
        input order.
    """
    check_on_error(on_error)
    report = report if report is not None else SkipReport()
    for path in expand_inputs(inputs, on_error=on_error, report=report):
        count = 0
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            docs = _jsonl_documents(path, text_field, max_line_bytes, on_error, report)
        else:
            docs = _text_documents(path, max_line_bytes, on_error, report)
        for doc in docs:
            count += 1
            yield doc
        if count == 0:
            report.handle(on_error, "empty_file", str(path), "no documents")


# ---------------------------------------------------------------------------------------------
# The embedded default corpus
# ---------------------------------------------------------------------------------------------

_CORPUS_VERSION = 3
DEFAULT_CORPUS_BYTES = 6_000_000  # ~1.5M tokens: a tiny model learns visibly in minutes on CPU
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)")
_LETTERS = re.compile(r"[A-Za-z]")


def _clean_docstring(doc: str) -> str | None:
    """Keep prose: drop doctest lines and rule lines, unwrap the lines into one paragraph, reject code-like text.

    Docstrings are hard-wrapped; keeping their line breaks would make newline bytes a frequent MLM target.
    """
    kept = []
    for line in doc.splitlines():
        stripped = line.strip()
        if not stripped or _DOCTEST.match(line) or not _LETTERS.search(stripped):
            continue  # blank lines would split the document; rules like "-----" carry no text
        kept.append(stripped)
    text = " ".join(kept)
    words = text.split()
    if len(words) < 8:
        return None
    letters = len(_LETTERS.findall(text))
    if letters < 0.6 * len(text) or not text.isascii():
        return None  # signatures, tables and non-English text make a poor English sample
    return text


# After the standard library, these packages (declared dependencies of roberta-pl, so installed wherever it
# is) are read in this order until the corpus is full. The stdlib gives ~1.5 MB and torch the rest, so the
# default corpus is the same on every machine with the same Python minor version and torch release.
CORPUS_PACKAGES = ("torch", "numpy", "matplotlib", "torchmetrics", "lightning", "deepspeed", "wandb", "rich")
# sha256 of the default corpus where it was measured, by corpus_key(); the README's quickstart figures come from it.
# Another (Python, torch) pair builds its own corpus (under its own name). The same pair building other content is an
# error: its figures would silently not be the README's.
REFERENCE_CORPUS_SHA256 = {
    ("3.11.7", "2.13.0", DEFAULT_CORPUS_BYTES): "3889e2acb95b4d8428598183adefd306b10b66b07951a37760991615e23d1577",
}
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name).split("+")[0]  # 2.13.0+cpu and 2.13.0+cu128 ship the same sources
    except metadata.PackageNotFoundError:
        return None


def _python_sources() -> Iterator[Path]:
    """The standard library, then :data:`CORPUS_PACKAGES` in that order: never whatever else is installed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield from sorted(p for p in stdlib.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(stdlib).parts))
    purelib = Path(sysconfig.get_paths()["purelib"])
    for name in CORPUS_PACKAGES:
        top = purelib / name
        if top.is_dir():
            yield from sorted(p for p in top.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(top).parts))


def corpus_key(target_bytes: int = DEFAULT_CORPUS_BYTES) -> tuple[str, str, int]:
    """What the default corpus's content depends on: (exact Python version, torch release, size). Patch releases
    change docstrings too: Python 3.11.2 gives 5,238 stdlib docstrings, 3.11.7 5,863."""
    return platform.python_version(), _package_version("torch") or "none", target_bytes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_path(path: Path) -> Path:
    """Where the sha256 of a built corpus is recorded, beside it."""
    return path.with_name(path.name + ".sha256")


def _check_reference(path: Path, target_bytes: int) -> str:
    """The corpus's sha256, checked against the reference build for the same key.

    Raises:
        DataError: one line, when this (Python, torch) pair, for which the reference was measured, built another
            corpus.
    """
    digest = _sha256(path)
    key = corpus_key(target_bytes)
    expected = REFERENCE_CORPUS_SHA256.get(key)
    if expected is not None and digest != expected:
        raise DataError(
            f"{path}: the default corpus built here has sha256 {digest[:12]}..., not the {expected[:12]}... recorded "
            f"for Python {key[0]} with torch {key[1]} (data_pipelines/corpus.py REFERENCE_CORPUS_SHA256), so runs on "
            f"it would not be the README's: the same versions read other docstrings (a patched standard library or "
            f"torch?) or the builder changed without a new _CORPUS_VERSION; train on your own text instead "
            f"(roberta-pl-data tokenizer/shards), or record the new hash")
    return digest


def _check_recorded(path: Path) -> None:
    """Refuse a cached corpus whose content is not what was recorded when it was built (one line)."""
    record = _record_path(path)
    recorded = record.read_text().strip() if record.exists() else None
    digest = _sha256(path)
    if recorded != digest:
        what = f"sha256 {digest[:12]}..., not the {recorded[:12]}... recorded when it was built" if recorded else \
            f"no record of its sha256 ({record.name}) beside it"
        raise DataError(f"{path}: cached default corpus has {what}: it was changed or written by something else; "
                        f"delete it (and {record.name}) to rebuild it")


def build_default_corpus(out_path: Path, target_bytes: int = DEFAULT_CORPUS_BYTES) -> Path:
    """Write the docstring corpus to ``out_path`` (atomically), one docstring per document.

    Args:
        out_path: the ``.txt`` file to write.
        target_bytes: stop once this much text is collected.

    Returns:
        ``out_path``.
    """
    started = time.monotonic()
    seen: set[bytes] = set()
    total = docs = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".partial-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for source in _python_sources():
            if total >= target_bytes:
                break
            try:
                tree = ast.parse(source.read_bytes())
            except (SyntaxError, ValueError, OSError, RecursionError):
                continue  # Python 2 leftovers and vendored oddities are not our problem
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                raw = ast.get_docstring(node)
                text = _clean_docstring(raw) if raw else None
                if text is None:
                    continue
                digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
                if digest in seen:
                    continue  # inherited/copied docstrings would overweight a few texts
                seen.add(digest)
                out.write(text + "\n\n")
                total += len(text) + 2
                docs += 1
    os.replace(tmp, out_path)
    log.info("built default corpus %s: %d docs, %.1f MB in %.1fs", out_path, docs, total / 1e6, time.monotonic() - started)
    return out_path


def default_corpus_path(target_bytes: int = DEFAULT_CORPUS_BYTES) -> Path:
    """Where :func:`default_corpus` keeps the corpus; the name says what its content depends on (exact Python version,
    torch release, size), so two versions never share a cache entry."""
    python, torch, _ = corpus_key(target_bytes)
    return cache_dir() / f"default_corpus-v{_CORPUS_VERSION}-py{python}-torch{torch}-{target_bytes // 1000}k.txt"


def default_corpus(target_bytes: int = DEFAULT_CORPUS_BYTES) -> Path:
    """Path of the embedded default corpus, building it on first use.

    Args:
        target_bytes: approximate size; part of the cache key.

    Returns:
        A ``.txt`` file of documents separated by blank lines.

    Raises:
        DataError: the build differs from the reference recorded for this Python and torch, or the cached corpus
            differs from the sha256 recorded when it was built.
    """
    path = default_corpus_path(target_bytes)
    if not path.exists():
        # Built and checked under a temporary name, so a corpus that failed its check is never in the cache.
        built = build_default_corpus(path.with_name(f"{path.name}.building-{os.getpid()}"), target_bytes)
        try:
            digest = _check_reference(built, target_bytes)
            _atomic_write(_record_path(path), digest + "\n")  # the record first: a corpus never lacks one
            os.replace(built, path)
        finally:
            built.unlink(missing_ok=True)
    _check_recorded(path)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
