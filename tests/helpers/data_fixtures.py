"""Shared, real test assets for the data-pipeline tests (import the fixtures into a test module).

Everything is built once per test session under pytest's temp dir: a ~300 kB corpus of real
English (standard-library docstrings, via the same builder as the embedded default corpus), a
small SentencePiece tokenizer trained on it, and WebDataset shards of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipelines.corpus import build_default_corpus, iter_documents
from data_pipelines.shards import write_shards
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

VOCAB_SIZE = 800
_CACHE: dict[str, Path] = {}


def _once(key: str, base: Path, build) -> Path:
    # Session fixtures imported into several modules are separate fixture definitions; this keeps
    # the expensive builds to one per session anyway.
    if key not in _CACHE:
        _CACHE[key] = build(base / key)
    return _CACHE[key]


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Run a module's torch ops on one thread (the CI box is shared; OpenMP spinning on a busy
    machine makes small tensor ops 30× slower), restoring the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A real-English corpus file (docs separated by blank lines), ~300 kB."""
    base = tmp_path_factory.getbasetemp()
    return _once("corpus", base, lambda p: build_default_corpus(p / "corpus.txt", target_bytes=300_000))


@pytest.fixture(scope="session")
def corpus_docs(corpus_file) -> list[str]:
    """The documents of :func:`corpus_file`."""
    return list(iter_documents(corpus_file))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    """A tokenizer trained on the corpus (vocab 800)."""
    base = tmp_path_factory.getbasetemp()

    def build(path: Path) -> Path:
        train_tokenizer(corpus_file, path, vocab_size=VOCAB_SIZE, input_sentence_size=50_000)
        return path

    return _once("tokenizer", base, build)


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    """The loaded tokenizer."""
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    """Shards of the corpus: 9 train shards (~120 docs each, globally shuffled) and a 5% valid split."""
    base = tmp_path_factory.getbasetemp()

    def build(path: Path) -> Path:
        write_shards(corpus_file, tokenizer_dir, path, num_shards=9, valid_fraction=0.05, num_workers=2, progress=False)
        return path

    return _once("shards", base, build)


def write_corpus_dir(tmp_path: Path, docs: list[str], files: int = 4) -> Path:
    """``docs`` split over ``files`` text files in ``tmp_path/corpus`` (documents separated by a blank line):
    a corpus the sharding tasks can divide by file."""
    d = tmp_path / "corpus"
    d.mkdir()
    per = -(-len(docs) // files)
    for i in range(files):
        (d / f"part-{i}.txt").write_text("\n\n".join(docs[i * per : (i + 1) * per]) + "\n")
    return d


def mlm_datamodule(train_shards, tokenizer_dir, *, seq_len: int, micro_batch_size: int, accumulation=1, **options):
    """A connected :class:`~data_pipelines.datamodule.MLMDataModule` from flat keyword options, for tests: each option
    goes to the :class:`~data_pipelines.masking.MaskingConfig` or
    :class:`~data_pipelines.datamodule.DataSettings` field of its name, the rest (``valid_shards``, ``rank``,
    ``world_size``, ...) to the DataModule itself."""
    import dataclasses

    from data_pipelines.datamodule import DataSettings, MLMDataModule
    from data_pipelines.masking import MaskingConfig

    parts = {}
    for cls in (MaskingConfig, DataSettings):
        names = {f.name for f in dataclasses.fields(cls)}
        parts[cls] = cls(**{k: options.pop(k) for k in list(options) if k in names})
    dm = MLMDataModule(train_shards, tokenizer_dir, masking=parts[MaskingConfig], settings=parts[DataSettings], **options)
    return dm.connect(seq_len, micro_batch_size, accumulation=accumulation)
