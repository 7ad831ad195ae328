"""Labelled examples for fine-tuning, read from CSV, TSV, JSONL or CoNLL files.

Every problem is a :class:`~data_pipelines.errors.DataError` whose one line names the file and the line
the row is on (what an editor jumps to): a missing column, an empty text, a row that is not JSON, tags that
do not match the words.

Formats (``fmt="auto"`` picks by extension):

- ``csv`` / ``tsv``: a header row names the columns, or ``header=False`` with ``columns=[...]`` (GLUE's
  CoLA has no header). TSV is read without quote handling, as GLUE's files need (their texts hold
  unbalanced ``"``).
- ``jsonl``: one object per line. For token classification the words and tags are lists.
- ``conll``: one word per line with its tag in the last column, blank lines between sentences
  (``-DOCSTART-`` lines skipped), as CoNLL-2003.

For token classification in CSV/TSV, the words and tags columns hold space-separated strings.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_pipelines.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "conll")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".conll": "conll",
               ".txt": "conll", ".iob": "conll", ".bio": "conll"}


@dataclass
class Example:
    """One labelled (or unlabelled) row.

    Attributes:
        line: 1-based line of the row in its file (the first line, for multi-line CoNLL sentences).
        text: the text, or the list of words for token classification.
        text_pair: the second text of a pair task, else None.
        label: the class name, the regression target (as written), the list of tags, or None when the
            file has no labels (a test file).
    """

    line: int
    text: str | list[str]
    text_pair: str | None = None
    label: str | list[str] | None = None


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"{path}: format={fmt!r}; choose one of {', '.join(FORMATS)} or auto")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DataError(f"{path}: cannot tell the format from the extension {suffix!r}; set the format "
                        f"({', '.join(FORMATS)})")
    return _EXTENSIONS[suffix]


def read_rows(path: str | Path, fmt: str = "auto", header: bool = True,
              columns: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` pairs of a CSV, TSV or JSONL file; ``row`` maps column names to values."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = detect_format(path, fmt)
    if fmt == "conll":
        raise DataError(f"{path}: CoNLL files hold word/tag columns, not named fields; use them for token classification")
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would otherwise prefix the first column.
    with path.open(encoding="utf-8-sig", newline="" if fmt != "jsonl" else None) as f:
        try:
            if fmt == "jsonl":
                for line, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {line}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}, line {line}: expected a JSON object, got {type(row).__name__}")
                    yield line, row
                return
            csv.field_size_limit(sys.maxsize)
            reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f))
            names = list(columns) if columns else None
            if header:
                first = next(reader, None)
                if first is None:
                    return
                names = names or first
            if not names:
                raise DataError(f"{path}: header=false needs the column names (columns=[...])")
            start = reader.line_num
            for values in reader:
                line, start = start + 1, reader.line_num
                if not values or values == [""]:
                    continue
                if len(values) != len(names):
                    raise DataError(f"{path}, line {line}: {len(values)} fields where the header has {len(names)} "
                                    f"({', '.join(names)})")
                yield line, dict(zip(names, values))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: {e}") from None


def _field(path: Path, line: int, row: dict, column: str):
    if column not in row:
        raise DataError(f"{path}, line {line}: missing column {column!r} (columns: {', '.join(map(str, row))})")
    return row[column]


def _text(path: Path, line: int, row: dict, column: str) -> str:
    value = _field(path, line, row, column)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}, line {line}: empty text in column {column!r}")
    return value


def read_sequence_examples(path: str | Path, text_column: str, label_column: str | None,
                           text_pair_column: str | None = None, fmt: str = "auto", header: bool = True,
                           columns: list[str] | None = None, require_labels: bool = True) -> list[Example]:
    """Examples for sequence classification or regression.

    Args:
        path: the file.
        text_column, text_pair_column: the text (and second text of a pair) columns.
        label_column: the label column; a row without it is an error when ``require_labels``, else the
            example has no label (a test file).
        fmt, header, columns: see :func:`read_rows`.
    """
    path = Path(path)
    examples = []
    for line, row in read_rows(path, fmt, header, columns):
        text = _text(path, line, row, text_column)
        pair = _text(path, line, row, text_pair_column) if text_pair_column else None
        label = None
        if label_column and (require_labels or row.get(label_column) is not None):
            value = _field(path, line, row, label_column)
            label = "" if value is None else str(value).strip()  # JSON null is a missing label, not "None"
            if not label and require_labels:
                raise DataError(f"{path}, line {line}: empty label in column {label_column!r}")
            label = label or None  # a test file's empty cell: an unlabelled row
        examples.append(Example(line, text, pair, label))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _words(path: Path, line: int, value, column: str) -> list[str]:
    words = value.split() if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, (str, int)) and not isinstance(w, bool) for w in words):
        raise DataError(f"{path}, line {line}: column {column!r} must be a list of strings or a space-separated string")
    words = [str(w) for w in words]  # integer tag ids (as datasets exports them); task.labels names them
    if any(not w.strip() for w in words):
        raise DataError(f"{path}, line {line}: empty word in column {column!r}")
    return words


def read_token_examples(path: str | Path, tokens_column: str = "tokens", tags_column: str | None = "tags",
                        fmt: str = "auto", header: bool = True, columns: list[str] | None = None,
                        require_labels: bool = True) -> list[Example]:
    """Examples for token classification: words and one tag per word.

    Args:
        path: the file (CSV/TSV/JSONL with the two columns, or CoNLL).
        tokens_column, tags_column: the words and tags columns (ignored for CoNLL).
    """
    path = Path(path)
    if detect_format(path, fmt) == "conll":
        examples = list(_read_conll(path, require_labels))
    else:
        examples = []
        for line, row in read_rows(path, fmt, header, columns):
            words = _words(path, line, _field(path, line, row, tokens_column), tokens_column)
            if not words:
                raise DataError(f"{path}, line {line}: empty text in column {tokens_column!r}")
            tags = None
            if tags_column and (require_labels or row.get(tags_column) is not None):
                tags = _words(path, line, _field(path, line, row, tags_column), tags_column)
                if len(tags) != len(words):
                    raise DataError(f"{path}, line {line}: {len(words)} words but {len(tags)} tags")
            examples.append(Example(line, words, None, tags))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _read_conll(path: Path, require_labels: bool) -> Iterator[Example]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    words: list[str] = []
    tags: list[str] = []
    start, untagged = 0, False
    with path.open(encoding="utf-8-sig") as f:
        try:
            for line, raw in enumerate(f, 1):
                parts = raw.split()
                if not parts or parts[0] == "-DOCSTART-":
                    if words:
                        yield Example(start, words, None, None if untagged else tags)
                    words, tags, untagged = [], [], False
                    continue
                if not words:
                    start = line
                if len(parts) == 1 and require_labels:
                    raise DataError(f"{path}, line {line}: word {parts[0]!r} has no tag column")
                words.append(parts[0])
                if len(parts) > 1:
                    tags.append(parts[-1])
                else:  # a test file's untagged word: the sentence is predicted, not scored
                    untagged = True
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if words:
        yield Example(start, words, None, None if untagged else tags)
