"""What pretraining needs from data_pipelines: a tokenizer, shard specs and the DataModule.

With no shards configured, the embedded default corpus (docstrings of the Python stdlib and torch) is
turned into a tokenizer and shards once, under ``data.cache_dir``, and reused by every later run; a continued run
(``pretrained=PATH``) shards it with PATH's tokenizer instead, cached under that tokenizer's hash.
"""

from __future__ import annotations

import contextlib
import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from data_pipelines.tokenizer import SpmTokenizer, load_tokenizer
from roberta_pl.batch_plan import BatchPlan, StepHorizon
from roberta_pl.checks import uses_cuda

if TYPE_CHECKING:
    from roberta_pl.checkpoints import PretrainedInfo

DEFAULT_DATASET_VERSION = 5  # bump when the default corpus, tokenizer or shard settings change (4: shard format 2; 5: whitespace pieces)


@dataclass
class PretrainData:
    tokenizer: SpmTokenizer
    train_shards: str
    valid_shards: str | None


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock across processes (all Slurm ranks start at once; one builds, the others wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _default_dataset(cache_dir: Path, vocab_size: int, tokenizer: SpmTokenizer | None = None) -> PretrainData:
    from data_pipelines.corpus import default_corpus, default_corpus_path
    from data_pipelines.manifest import load_manifest
    from data_pipelines.shards import write_shards
    from data_pipelines.tokenizer import META_FILE, train_tokenizer

    # Keyed on the corpus's own name (Python minor version, torch release), so a new torch gets new shards, and on
    # the tokenizer: the vocabulary of the one trained here, or the hash of a given one (a pretrained model's).
    key = f"tok{tokenizer.hash}" if tokenizer is not None else f"vocab{vocab_size}"
    root = cache_dir / f"default-dataset-v{DEFAULT_DATASET_VERSION}-{default_corpus_path().stem}-{key}"
    with file_lock(root / ".lock"):  # concurrent ranks or jobs: one builds, the others wait and reuse
        tok_dir, shard_dir = (root / "tokenizer" if tokenizer is None else tokenizer.path), root / "shards"
        corpus = default_corpus()
        if tokenizer is None and not (tok_dir / META_FILE).exists():
            print(f"Training a {vocab_size}-token SentencePiece tokenizer on the default corpus -> {tok_dir}")
            train_tokenizer(corpus, tok_dir, vocab_size=vocab_size, input_sentence_size=300_000)
        if not (shard_dir / "manifest.json").exists():
            print(f"Writing default-corpus shards -> {shard_dir}")
            write_shards(corpus, tok_dir, shard_dir, valid_fraction=0.02)  # shard count from the corpus size (22)
        manifest = load_manifest(shard_dir / "manifest.json")
    has_valid = manifest["splits"].get("valid", {}).get("num_shards", 0) > 0
    # A shard directory stands for its manifest's train (or valid) split.
    return PretrainData(tokenizer if tokenizer is not None else load_tokenizer(tok_dir), str(shard_dir), str(shard_dir) if has_valid else None)


def prepare_data(cfg: DictConfig, source: PretrainedInfo | None = None) -> PretrainData:
    """The tokenizer and shard specs of ``cfg.data``, building the default dataset when none is given. A continued
    run (``source``: what ``pretrained=`` names) takes PATH's tokenizer, or a ``data.tokenizer`` with its hash."""
    d = cfg.data
    check_data_source(d, continued=source is not None)
    tokenizer = None
    if source is not None:
        from roberta_pl.pretraining.init import continued_tokenizer

        tokenizer = continued_tokenizer(cfg, source)
    if d.train_shards is None:
        return _default_dataset(Path(d.cache_dir).expanduser(), d.default_vocab_size, tokenizer)
    return PretrainData(tokenizer if tokenizer is not None else load_tokenizer(d.tokenizer), str(d.train_shards),
                        str(d.valid_shards) if d.valid_shards else None)


def check_data_source(d: DictConfig, continued: bool = False) -> None:
    """Refuse ``data=shards`` (``data.require_shards``) without the shards and tokenizer it needs: without them
    the run would train on the embedded default corpus, which nobody asked for. A ``continued`` run
    (``pretrained=``) needs no ``data.tokenizer``: its default is the model's own.

    Raises:
        ConfigError: one line naming the unset keys and what to set.
    """
    from roberta_pl.errors import ConfigError

    missing = [key for key in ("train_shards", *(() if continued else ("tokenizer",))) if d.get(key) is None]
    if d.get("require_shards") and missing:
        raise ConfigError(
            f"data=shards but {' and '.join('data.' + k for k in missing)} {'is' if len(missing) == 1 else 'are'} not "
            f"set: set data.train_shards=DIR (a shard directory from `roberta-pl-data shards`) and data.tokenizer=DIR "
            f"(the tokenizer the shards were written with), or use data=default for the embedded corpus")


def build_datamodule(cfg: DictConfig, data: PretrainData, horizon: StepHorizon):
    """The streaming MLM DataModule for this config, connected to the run's batch plan.

    ``cfg.data`` becomes two objects, the masking recipe and the stream settings, built once here; the batch plan
    is given once, through ``connect``: the sequence length, the micro-batch and the accumulation phases, from
    which the data side derives both the step windows (each batch carries its step's masked-token count, the
    loss's denominator) and epochs of whole optimizer steps (Lightning would otherwise step on a partial
    accumulation at each epoch end: a smaller global batch, and a drifting step count)."""
    from data_pipelines.datamodule import MLMDataModule

    plan = horizon.plan
    dm = MLMDataModule(data.train_shards, str(data.tokenizer.path), valid_shards=data.valid_shards,
                       masking=masking_config(cfg), settings=data_settings(cfg, data, plan),
                       mask_schedule=mask_schedule(cfg, horizon))
    return dm.connect(plan.seq_len, plan.micro_batch_size, accumulation=plan.phases)


def masking_config(cfg: DictConfig):
    """The masking recipe of ``cfg.data`` (the rate validation masks at; a schedule moves the training rate)."""
    from data_pipelines.masking import MaskingConfig

    d = cfg.data
    return MaskingConfig(mask_prob=d.mask_prob, random_prob=d.random_prob, keep_prob=d.keep_prob, strategy=d.masking)


def data_settings(cfg: DictConfig, data: PretrainData, plan: BatchPlan):
    """How the streams of ``cfg.data`` are read: packing, the run's seed, workers (chosen when unset), shuffle
    window, bad shards, and page-locked batches when they go to a CUDA device."""
    from data_pipelines.datamodule import DataSettings

    d = cfg.data
    return DataSettings(pack_mode=str(d.packing), seed=cfg.seed, num_workers=data_workers(cfg, data, plan),
                        shuffle_window=d.shuffle_window, on_error=str(d.on_error), pin_memory=uses_cuda(cfg))


def data_workers(cfg: DictConfig, data: PretrainData, plan: BatchPlan) -> int:
    """``data.num_workers``, or when it is None the most that the rank's CPUs and the train shards allow (logged once)."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from data_pipelines.epochs import default_num_workers
    from data_pipelines.manifest import resolve_shards
    from roberta_pl.trainer import rank_cpus

    shards = len(resolve_shards(data.train_shards, split="train").shards)
    ranks_here = max(1, plan.world_size // max(1, int(cfg.trainer.num_nodes)))
    cpus = rank_cpus(ranks_here)  # the same share the rank's torch threads get
    workers = default_num_workers(shards, plan.world_size, cpus)
    if rank_zero_only.rank == 0:  # once per run, not once per rank
        logging.getLogger("roberta_pl").info(
            "data.num_workers unset: %d DataLoader worker(s) per rank, for %d CPU(s) per rank and %d train shard(s) over "
            "%d rank(s) (at most 4); set data.num_workers to choose", workers, cpus, shards, plan.world_size)
    return workers


def mask_schedule(cfg: DictConfig, horizon: StepHorizon):
    """The training mask-rate schedule of ``data.mask_prob_start`` (None without one), in micro-batches per rank:
    ``mask_prob_start`` through the LR warm-up, then linear to ``data.mask_prob`` at the run's step horizon, which it
    follows (a time budget fixes it during the warm-up; the DataLoader workers read it from shared memory)."""
    from data_pipelines.masking import MaskSchedule

    d = cfg.data
    if d.mask_prob_start is None:
        return None
    schedule = MaskSchedule(d.mask_prob_start, d.mask_prob, horizon.micro_batches_before(cfg.optim.warmup_steps))
    horizon.follow(lambda steps: schedule.set_horizon(horizon.micro_batches_before(steps)))
    return schedule
