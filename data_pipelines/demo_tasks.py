"""Small labelled fine-tuning tasks built from text already on the machine (standard-library docstrings),
so fine-tuning can be tried, and tested, without downloading a dataset. The same Python gives the same files.

- ``sources``: which part of the standard library a docstring comes from (the mail/web stack or the
  concurrency stack), a balanced two-class CSV (``text``, ``source``);
- ``topics``: the same question over five parts (mail/web, concurrency, files, data formats, developer tools),
  a balanced five-class CSV (``text``, ``source``);
- ``tagging``: find the code identifiers (``os.path``, ``set_result()``) in docstring prose, BIO tags in
  CoNLL format.

``roberta-pl-data demo-task OUT --kind sources|tagging`` writes them.
"""

from __future__ import annotations

import ast
import csv
import random
import re
import sysconfig
from pathlib import Path

from data_pipelines.corpus import _clean_docstring
from data_pipelines.errors import DataError

# Two sources: the mail/web stack vs the concurrency stack of the standard library. A docstring corpus
# (the default one, the tests' one) may hold these passages unlabelled; the labels are what is learned.
SOURCES = {"web": ("email", "http", "urllib", "xmlrpc", "wsgiref", "mailbox.py", "smtplib.py", "imaplib.py", "ftplib.py"),
           "concurrency": ("multiprocessing", "concurrent", "threading.py", "queue.py", "sched.py", "selectors.py",
                           "subprocess.py", "signal.py")}


def docstrings(names: tuple[str, ...], max_words: int = 40) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in names:
        root = stdlib / name
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root] if root.is_file() else []
        for f in files:  # a module this Python lacks is skipped: the size check below decides
            if "test" in f.relative_to(stdlib).parts:
                continue
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8", errors="replace"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                    doc = ast.get_docstring(node)
                    text = _clean_docstring(doc) if doc else None
                    if text:
                        out.append(" ".join(text.split()[:max_words]))
    return sorted(set(out))


# Five parts of the standard library, for a harder (five-way) version of the same question.
TOPICS = SOURCES | {
    "files": ("pathlib.py", "shutil.py", "tarfile.py", "zipfile", "glob.py", "fnmatch.py", "tempfile.py", "filecmp.py",
              "os.py", "posixpath.py", "genericpath.py"),
    "data": ("json", "csv.py", "pickle.py", "sqlite3", "xml", "plistlib.py", "configparser.py", "tomllib", "shelve.py",
             "dbm", "copyreg.py"),
    "tools": ("unittest", "doctest.py", "pdb.py", "bdb.py", "cProfile.py", "profile.py", "pstats.py", "trace.py",
              "timeit.py", "logging", "argparse.py", "inspect.py", "dis.py", "ast.py"),
}


def two_source_task(out_dir: Path, n_train: int = 160, n_valid: int = 120, seed: int = 0,
                    sources: dict[str, tuple[str, ...]] = SOURCES) -> dict[str, Path]:
    """A balanced CSV task (``text``, ``source``): which part of the stdlib a docstring is from, one class per
    entry of ``sources`` (two by default; :data:`TOPICS` for five)."""
    rng = random.Random(seed)
    per_class = {label: docstrings(names) for label, names in sources.items()}
    n = min(len(v) for v in per_class.values())
    rows = []
    for label, texts in per_class.items():
        rng.shuffle(texts)
        rows += [(t, label) for t in texts[:n]]
    rng.shuffle(rows)
    need = n_train + n_valid
    if len(rows) < need:
        raise DataError(f"only {len(rows)} docstrings for {need} examples; ask for fewer")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"train": out_dir / "train.csv", "valid": out_dir / "valid.csv"}
    for split, part in (("train", rows[:n_train]), ("valid", rows[n_train:need])):
        with files[split].open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "source"])
            w.writerows(part)
    return files


def topics_task(out_dir: Path, n_train: int = 250, n_valid: int = 150, seed: int = 0) -> dict[str, Path]:
    """The five-class version of :func:`two_source_task` (:data:`TOPICS`)."""
    return two_source_task(out_dir, n_train, n_valid, seed, sources=TOPICS)


_CODE = re.compile(r"^[\w.]*([._]\w|\(\)|\w\.\w)[\w.()]*$")


def code_tags(words: list[str]) -> list[str]:
    """BIO tags marking code-like words (``os.path``, ``set_result()``, ``max_workers``) as CODE entities;
    a run of adjacent ones is one entity."""
    tags, prev = [], False
    for w in words:
        code = bool(_CODE.match(w.strip(",.:;")))
        tags.append(("I-CODE" if prev else "B-CODE") if code else "O")
        prev = code
    return tags


def tagging_task(out_dir: Path, n_train: int = 160, n_valid: int = 60, seed: int = 0) -> dict[str, Path]:
    """A CoNLL-format tagging task over real docstrings: find the code identifiers in the prose."""
    rng = random.Random(seed)
    texts = docstrings(SOURCES["web"] + SOURCES["concurrency"], max_words=30)
    rng.shuffle(texts)
    with_code = [t for t in texts if "CODE" in "".join(code_tags(t.split()))]
    if len(with_code) < n_train + n_valid:
        raise DataError(f"only {len(with_code)} docstrings with code identifiers for {n_train + n_valid} examples; ask for fewer")
    rows = with_code[: n_train + n_valid]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"train": out_dir / "train.conll", "valid": out_dir / "valid.conll"}
    for split, part in (("train", rows[:n_train]), ("valid", rows[n_train:])):
        with files[split].open("w", encoding="utf-8") as f:
            f.write("-DOCSTART- -X- -X- O\n\n")
            for text in part:
                words = text.split()
                f.writelines(f"{w} {t}\n" for w, t in zip(words, code_tags(words)))
                f.write("\n")
    return files
