"""Task files → model inputs for fine-tuning: reading and checking a task's files, tokenizer adapters, RoBERTa's input format, label maps,
first-sub-token label alignment, truncation with counted warnings, and padded batches.

RoBERTa's formats: ``<s> A </s>`` for one text, ``<s> A </s></s> B </s>`` for a pair (fairseq/HF).
For token classification each word is tokenized on its own and only its first piece carries the label;
the other pieces get -100 (ignored by the loss and the metrics).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from data_pipelines.contract import IGNORE_INDEX
from data_pipelines.errors import DataError
from data_pipelines.tabular import Example, read_sequence_examples, read_token_examples

log = logging.getLogger("roberta_pl.finetune")


# -- tokenizers --------------------------------------------------------------------------------------
class TextTokenizer(Protocol):
    path: Path
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_words(self, words: Sequence[str]) -> list[list[int]]: ...


class SentencePieceWords:
    """Our SentencePiece tokenizer; each word encodes alone and gets its own word-start piece ("▁")."""

    def __init__(self, tok):
        self.tok, self.path = tok, tok.path
        self.bos_id, self.eos_id, self.pad_id = tok.bos_id, tok.eos_id, tok.pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok.encode_batch(list(texts))  # SentencePiece runs the batch in native threads

    def encode_words(self, words: Sequence[str]) -> list[list[int]]:
        return self.encode_batch(words)


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of a model directory or tokenizer directory: ours (``spm.model``), else any HF RoBERTa-family
    tokenizer (:class:`data_pipelines.hf_tokenizer.HFTokenizer`, whose ``encode_words`` gives each word the pieces
    it has in the running sentence)."""
    from data_pipelines.tokenizer import SpmTokenizer, load_tokenizer

    tok = load_tokenizer(path)
    return SentencePieceWords(tok) if isinstance(tok, SpmTokenizer) else tok


# -- labels --------------------------------------------------------------------------------------------
def _label_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def build_label_list(examples: list[Example], path: Path, token_level: bool) -> list[str]:
    """Sorted label names found in the training file (numbers numerically: "0" < "1" < "10")."""
    labels: set[str] = set()
    for ex in examples:
        if ex.label is None:
            raise DataError(f"{path}, line {ex.line}: no label")
        labels.update(ex.label if token_level else [ex.label])
    if len(labels) < 2:
        raise DataError(f"{path}: only one label ({', '.join(labels)}) in the training file; nothing to classify")
    return sorted(labels, key=_label_key)


def check_labels(examples: list[Example], labels: list[str], path: Path, train_path: Path | str) -> None:
    """Every label of ``examples`` must be one the model has; the error names the file, line and label."""
    known = set(labels)
    for ex in examples:
        for label in (ex.label if isinstance(ex.label, list) else [ex.label] if ex.label is not None else []):
            if label not in known:
                raise DataError(f"{path}, line {ex.line}: label {label!r} never seen in training ({train_path}); "
                                f"labels: {', '.join(labels)}")


def parse_target(ex: Example, path: Path) -> float:
    try:
        value = float(ex.label)
    except (TypeError, ValueError):
        raise DataError(f"{path}, line {ex.line}: regression target {ex.label!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}, line {ex.line}: regression target {ex.label!r} is not finite")
    return value


# -- features ------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Encoded examples of one file. ``labels[i]`` is a class id, a float target, a per-token list (with
    -100 off the first pieces) or None; ``truncated`` lists the lines that lost tokens."""

    input_ids: list[list[int]]
    labels: list
    examples: list[Example]
    truncated: list[int] = field(default_factory=list)
    word_positions: list[list[int]] = field(default_factory=list)  # token tasks: position of each kept word

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_pair(tok: TextTokenizer, a: list[int], b: list[int] | None, max_len: int) -> tuple[list[int], bool]:
    """RoBERTa's input for one text or a pair, cut longest-first to ``max_len`` tokens in all."""
    budget = max_len - (2 if b is None else 4)
    a, b = list(a), list(b) if b is not None else None
    truncated = False
    while len(a) + (len(b) if b is not None else 0) > budget:
        truncated = True
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    ids = [tok.bos_id, *a, tok.eos_id]
    if b is not None:
        ids += [tok.eos_id, *b, tok.eos_id]
    return ids, truncated


def align_word_labels(word_pieces: list[list[int]], tags: list[int] | None, max_len: int,
                      bos_id: int, eos_id: int) -> tuple[list[int], list[int], list[int], bool]:
    """Token ids and per-token labels for a tagged sentence: the first piece of each word gets the word's
    tag, the others -100. Words that do not fit in ``max_len`` are dropped whole.

    Returns:
        ids, labels (all -100 when ``tags`` is None), the position of each kept word's first piece, and
        whether words were dropped.
    """
    ids, labels, positions = [bos_id], [IGNORE_INDEX], []
    for i, pieces in enumerate(word_pieces):
        if len(ids) + len(pieces) + 1 > max_len:
            ids.append(eos_id)
            labels.append(IGNORE_INDEX)
            return ids, labels, positions, True
        if pieces:  # a word SentencePiece maps to nothing (e.g. a lone control character) has no position
            positions.append(len(ids))
            ids.extend(pieces)
            labels.extend([tags[i] if tags is not None else IGNORE_INDEX] + [IGNORE_INDEX] * (len(pieces) - 1))
        else:
            positions.append(-1)
    ids.append(eos_id)
    labels.append(IGNORE_INDEX)
    return ids, labels, positions, False


def encode_examples(tok: TextTokenizer, examples: list[Example], path: Path, kind: str, labels: list[str],
                    regression: bool, max_len: int) -> Features:
    """Encode a file's examples; truncation is counted and warned about once per file."""
    label_id = {name: i for i, name in enumerate(labels)}
    feats = Features([], [], examples)
    if kind == "token_classification":
        for ex in examples:
            tags = [label_id[t] for t in ex.label] if ex.label is not None else None
            ids, lab, positions, cut = align_word_labels(tok.encode_words(ex.text), tags, max_len, tok.bos_id, tok.eos_id)
            feats.input_ids.append(ids)
            feats.labels.append(lab if tags is not None else None)
            feats.word_positions.append(positions)
            if cut:
                feats.truncated.append(ex.line)
    else:
        texts = tok.encode_batch([ex.text for ex in examples])
        pairs = tok.encode_batch([ex.text_pair for ex in examples]) if examples[0].text_pair is not None else None
        for i, ex in enumerate(examples):
            ids, cut = encode_pair(tok, texts[i], pairs[i] if pairs else None, max_len)
            feats.input_ids.append(ids)
            if ex.label is None:
                feats.labels.append(None)
            else:
                feats.labels.append(parse_target(ex, path) if regression else label_id[ex.label])
            if cut:
                feats.truncated.append(ex.line)
    if feats.truncated:
        what = "sentences lost words" if kind == "token_classification" else "texts were cut"
        log.warning("%s: %d of %d %s to fit max_seq_len=%d (first at line %d)",
                    path, len(feats.truncated), len(examples), what, max_len, feats.truncated[0])
    return feats


# -- batches -------------------------------------------------------------------------------------------
class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, feats: Features):
        self.feats = feats

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> tuple[list[int], object]:
        return self.feats.input_ids[i], self.feats.labels[i]


def collate(items: list[tuple[list[int], object]], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch; per-token labels pad with -100."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    first = items[0][1]
    if first is None:
        return batch
    if isinstance(first, list):
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for i, (_, lab) in enumerate(items):
            labels[i, : len(lab)] = torch.tensor(lab)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([lab for _, lab in items], dtype=torch.float if regression else torch.long)
    return batch


class FinetuneDataModule(pl.LightningDataModule):
    """Train and validation features as shuffled / ordered padded batches (Lightning adds the
    distributed sampler under DDP)."""

    def __init__(self, train: Features, valid: Features, micro_batch_size: int, pad_id: int, regression: bool,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.train, self.valid = train, valid
        self.micro_batch_size, self.pad_id, self.regression = micro_batch_size, pad_id, regression
        self.seed, self.num_workers = seed, num_workers

    def _loader(self, feats: Features, shuffle: bool) -> DataLoader:
        return make_loader(feats, self.micro_batch_size, self.pad_id, self.regression, shuffle=shuffle,
                           seed=self.seed, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.valid, shuffle=False)


def make_loader(feats: Features, batch_size: int, pad_id: int, regression: bool, shuffle: bool = False,
                seed: int = 0, num_workers: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(FeatureDataset(feats), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, collate_fn=functools.partial(collate, pad_id=pad_id, regression=regression))


@dataclass
class TaskData:
    labels: list[str]
    train: Features
    valid: Features
    test: Features | None
    files: dict[str, Path]


def load_task_data(task, tokenizer: TextTokenizer, max_len: int) -> TaskData:
    """Read, check and encode a task's files.

    Args:
        task: the task's settings (``kind``, ``*_file``, ``format``, columns, ``labels``, ``regression``), e.g.
            the ``task`` node of the fine-tuning config.
        tokenizer: the text tokenizer (:func:`load_text_tokenizer`).
        max_len: the longest encoded example; longer ones are truncated with a counted warning.

    Returns:
        The label list (from ``task.labels`` or the training file) and the encoded splits.
    """
    token = task.kind == "token_classification"
    files = {split: Path(task[f"{split}_file"]) for split in ("train", "valid", "test") if task.get(f"{split}_file")}

    def read(path: Path, require_labels: bool):
        common = dict(fmt=task.format, header=task.header, columns=list(task.columns) if task.columns else None,
                      require_labels=require_labels)
        if token:
            return read_token_examples(path, task.text_column, task.label_column, **common)
        return read_sequence_examples(path, task.text_column, task.label_column, task.text_pair_column, **common)

    examples = {split: read(path, require_labels=split != "test") for split, path in files.items()}
    if token:
        name_tag_ids(examples, list(task.labels or []), files)
    if task.regression:
        labels = list(task.labels or ["score"])
    else:
        labels = list(task.labels) if task.labels else build_label_list(examples["train"], files["train"], token)
        for split in examples:
            check_labels(examples[split], labels, files[split], files["train"])
    feats = {split: encode_examples(tokenizer, ex, files[split], task.kind, labels, task.regression, max_len)
             for split, ex in examples.items()}
    return TaskData(labels, feats["train"], feats["valid"], feats.get("test"), files)


def name_tag_ids(examples: dict, names: list[str], files: dict[str, Path]) -> None:
    """Tags given as integer ids (as HF ``datasets`` exports ``ner_tags``) become their names from
    ``task.labels``, in place; entity F1 needs BIO names (``B-PER``), so unnamed ids are refused."""
    tags = {t for ex in examples["train"] for t in ex.label or []}
    if not tags or not all(t.isdigit() for t in tags):
        return
    if not names:
        raise DataError(f"{files['train']}: the tags are integer ids; name them in order with "
                        f"task.labels=[O,B-PER,I-PER,...] (entity F1 needs BIO names)")
    for split, exs in examples.items():
        for ex in exs:
            for t in ex.label or []:
                if not t.isdigit() or int(t) >= len(names):
                    raise DataError(f"{files[split]}, line {ex.line}: tag {t!r} is not an id of task.labels "
                                    f"({len(names)} names)")
            if ex.label is not None:
                ex.label = [names[int(t)] for t in ex.label]
