"""What pretraining needs from data_pipelines: a tokenizer, shard specs and the DataModule.

With no shards configured, the embedded default corpus (docstrings of the Python stdlib and torch) is
turned into a tokenizer and shards once, under ``data.cache_dir``, and reused by every later run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from data_pipelines.tokenizer import SpmTokenizer, load_tokenizer
from roberta_pl.factory import file_lock
from roberta_pl.optim import BatchPlan, plan_ramp

DEFAULT_DATASET_VERSION = 3  # bump when the default corpus, tokenizer or shard settings change


@dataclass
class PretrainData:
    tokenizer: SpmTokenizer
    train_shards: str
    valid_shards: str | None


def _default_dataset(cache_dir: Path, vocab_size: int) -> PretrainData:
    from data_pipelines.corpus import default_corpus, default_corpus_path
    from data_pipelines.shards import load_manifest, write_shards
    from data_pipelines.tokenizer import META_FILE, train_tokenizer

    # Keyed on the corpus's own name (Python minor version, torch release), so a new torch gets new shards.
    root = cache_dir / f"default-dataset-v{DEFAULT_DATASET_VERSION}-{default_corpus_path().stem}-vocab{vocab_size}"
    with file_lock(root / ".lock"):  # concurrent ranks or jobs: one builds, the others wait and reuse
        tok_dir, shard_dir = root / "tokenizer", root / "shards"
        corpus = default_corpus()
        if not (tok_dir / META_FILE).exists():
            print(f"Training a {vocab_size}-token SentencePiece tokenizer on the default corpus -> {tok_dir}")
            train_tokenizer(corpus, tok_dir, vocab_size=vocab_size, input_sentence_size=300_000)
        if not (shard_dir / "manifest.json").exists():
            print(f"Writing default-corpus shards -> {shard_dir}")
            write_shards(corpus, tok_dir, shard_dir, docs_per_shard=2000, valid_fraction=0.02)
        manifest = load_manifest(shard_dir / "manifest.json")
    has_valid = manifest["splits"].get("valid", {}).get("num_shards", 0) > 0
    # A shard directory stands for its manifest's train (or valid) split.
    return PretrainData(load_tokenizer(tok_dir), str(shard_dir), str(shard_dir) if has_valid else None)


def prepare_data(cfg: DictConfig) -> PretrainData:
    """The tokenizer and shard specs of ``cfg.data``, building the default dataset when none is given."""
    d = cfg.data
    if d.train_shards is None:
        return _default_dataset(Path(d.cache_dir).expanduser(), d.default_vocab_size)
    return PretrainData(load_tokenizer(d.tokenizer), str(d.train_shards), str(d.valid_shards) if d.valid_shards else None)


_PACK_MODES = {"full_sentences": "full", "doc": "doc"}


def build_datamodule(cfg: DictConfig, data: PretrainData, plan: BatchPlan):
    """The streaming MLM DataModule for this config and batch plan."""
    from data_pipelines.datamodule import MLMDataModule

    d = cfg.data
    # Epochs hold whole optimizer steps: Lightning would otherwise step on a partial accumulation at
    # each epoch end (a smaller global batch, and a drifting step count).
    accumulations = [acc for _, _, acc in plan_ramp([tuple(r) for r in cfg.batch.ramp], plan)]
    return MLMDataModule(
        train_shards=data.train_shards, valid_shards=data.valid_shards, tokenizer_dir=str(data.tokenizer.path),
        seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size, mask_prob=d.mask_prob,
        random_prob=d.random_prob, keep_prob=d.keep_prob, whole_word=d.whole_word, span=d.span,
        pack_mode=_PACK_MODES[d.packing], seed=cfg.seed, num_workers=d.num_workers, shuffle_window=d.shuffle_buffer,
        on_error=d.on_error, batch_multiple=math.lcm(*accumulations),
    )
