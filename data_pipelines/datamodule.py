"""``MLMDataModule``: masked MLM batches for Lightning, with equal batches per rank and exact resume.

Usage::

    dm = MLMDataModule(train_shards="data/shards", tokenizer_dir="data/tokenizer",
                       seq_len=512, micro_batch_size=16, num_workers=4)
    trainer.fit(module, datamodule=dm)

Batches are ``{"input_ids", "attention_mask", "labels"}`` LongTensors ``[B, T]`` (see
:mod:`data_pipelines.stream`).

Resume. The whole data position is one number: ``consumed``, the micro-batches this rank has
trained on since the start of training. ``state_dict()`` saves it and Lightning stores it in the
checkpoint; ``load_state_dict()`` restores it, and the next train loader iteration starts at
epoch ``consumed // len(loader)``, batch ``consumed % len(loader)`` — the same token blocks and
the same masks (masks are seeded by (seed, step=global micro-batch index, rank)).

Counting is automatic inside a Lightning ``fit``: the train loader records each batch it hands
out, and this DataModule's ``on_before_batch_transfer`` hook — which Lightning calls for the batch
about to be trained on, after its one-batch prefetch — advances ``consumed`` when that batch is
really used. Outside Lightning (a plain loop), every batch taken from the iterator counts.
A training module that consumes batches some other way can call :meth:`MLMDataModule.set_consumed`.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data_pipelines.errors import DataError, OnError, check_on_error
from data_pipelines.masking import Masker, MaskingConfig
from data_pipelines.packing import PackMode
from data_pipelines.stream import (
    TRAIN_STREAM,
    VALID_STREAM,
    MaskedBatchStream,
    StreamConfig,
    keep_as_is,
    resolve_shards,
    unstack_batch,
)
from data_pipelines.tokenizer import load_tokenizer

log = logging.getLogger("data_pipelines")


def ignore_requeue_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGUSR1, SIGTERM and SIGINT; the training process acts.

    Slurm's ``--signal=SIGUSR1@90`` goes to every process of the job step, DataLoader workers included, and
    a forked worker inherits the trainer's handler: it would act on its stale copy of the run. A requeue or
    ``scancel`` (SIGTERM) and Ctrl-C (SIGINT) also reach every process: a worker that died of them first made
    the training process fail with a traceback per worker. The training process stops the run and shuts its
    workers down; if it is killed outright, workers exit when they see their parent gone.
    """
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _batch_key(batch: Any) -> int:
    """Identifies a handed-out batch when Lightning is about to train on it: its ``input_ids`` tensor, which
    every strategy passes on as it is (Lightning's DeepSpeed precision plugin copies the batch dict itself)."""
    return id(batch["input_ids"]) if isinstance(batch, dict) and "input_ids" in batch else id(batch)


class _ValidLoader(DataLoader):
    """A DataLoader over a stacked stream that hands out batch dicts."""

    def __init__(self, dataset: MaskedBatchStream, *, pin: bool = False, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=keep_as_is, **kwargs)
        self._pin = pin

    def __iter__(self) -> Iterator[dict]:
        for stacked in super().__iter__():
            yield unstack_batch(stacked, self._pin)


class _TrainLoader(DataLoader):
    """A DataLoader that starts each pass where the DataModule says and reports what it yields."""

    def __init__(self, datamodule: "MLMDataModule", dataset: MaskedBatchStream, *, pin: bool = False, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=keep_as_is, **kwargs)
        self._datamodule = datamodule
        self._pin = pin

    def __iter__(self) -> Iterator[dict]:
        dm = self._datamodule
        per_epoch = len(self.dataset)
        epoch, start = divmod(dm.consumed, per_epoch)
        self.dataset.set_position(epoch, start)
        dm._handed_out.clear()
        index = dm.consumed
        for stacked in super().__iter__():
            batch = unstack_batch(stacked, self._pin)
            if dm._lightning_counts:
                dm._handed_out.append((_batch_key(batch), index))  # counted when Lightning trains on it
            else:
                dm.consumed = index + 1  # plain loop: taking a batch is using it
            index += 1
            yield batch

    # Lightning also checkpoints a loader that has these two methods, and warns on a mid-epoch
    # resume when it lacks them; the state is the DataModule's, so both routes restore the same.
    def state_dict(self) -> dict[str, int]:
        """The DataModule's consumed count (Lightning's stateful-loader protocol)."""
        return {"consumed": self._datamodule.consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the DataModule's consumed count."""
        self._datamodule.set_consumed(state_dict["consumed"])


class MLMDataModule(L.LightningDataModule):
    """Streams masked-LM batches from WebDataset shards.

    Args:
        train_shards: shard directory, ``manifest.json``, brace pattern, ``pipe:`` URL or a list.
        tokenizer_dir: directory written by ``roberta-pl-data tokenizer``.
        seq_len: tokens per sequence, including ``<s>`` and ``</s>``.
        micro_batch_size: sequences per batch on each rank.
        valid_shards: like ``train_shards``, for validation (``None``: no validation loader).
            A directory means its manifest's ``valid`` split.
        manifest: manifest giving counts/hash for shards passed as patterns or ``pipe:`` URLs.
        mask_prob: fraction of tokens to predict.
        random_prob: fraction of predicted tokens replaced by a random token.
        keep_prob: fraction of predicted tokens left unchanged.
        whole_word: mask whole words (see docs/data.md for what a word is).
        span: SpanBERT span masking (geometric lengths of whole words).
        span_p: geometric parameter of span lengths.
        max_span: longest span, in words.
        pack_mode: ``"full"`` (FULL-SENTENCES, crosses documents, no padding) or ``"doc"``.
        seed: seed of shard assignment, order, shuffle and masks.
        num_workers: DataLoader workers per rank (0 reads in the main process).
        shuffle_window: blocks shuffled together in the train stream.
        batches_per_epoch: train batches per rank per epoch; ``None`` (default) derives the
            exact equal count from the manifest.
        batch_multiple: round the derived train batches per epoch down to a multiple of this — the
            gradient accumulation — so every optimizer step, epoch ends included, sums the same
            number of micro-batches.
        on_error: ``"raise"`` or ``"skip"`` (counted warning) for bad shards.
        rank: data-parallel rank when no Trainer is attached.
        world_size: data-parallel size when no Trainer is attached.
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        train_shards: str | os.PathLike | Sequence[str],
        tokenizer_dir: str | os.PathLike,
        seq_len: int = 512,
        micro_batch_size: int = 16,
        *,
        valid_shards: str | os.PathLike | Sequence[str] | None = None,
        manifest: str | os.PathLike | None = None,
        mask_prob: float = 0.15,
        random_prob: float = 0.1,
        keep_prob: float = 0.1,
        whole_word: bool = False,
        span: bool = False,
        span_p: float = 0.2,
        max_span: int = 10,
        pack_mode: PackMode = "full",
        seed: int = 0,
        num_workers: int = 0,
        shuffle_window: int = 1024,
        batches_per_epoch: int | None = None,
        batch_multiple: int = 1,
        on_error: OnError = "raise",
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        if pack_mode not in ("full", "doc"):
            raise DataError(f"pack_mode must be 'full' or 'doc', got {pack_mode!r}")
        if seq_len < 3 or micro_batch_size < 1 or num_workers < 0:
            raise DataError(f"need seq_len >= 3, micro_batch_size >= 1, num_workers >= 0; got {seq_len}, {micro_batch_size}, {num_workers}")
        self.train_shards = train_shards
        self.valid_shards = valid_shards
        self.manifest = manifest
        self.tokenizer_dir = tokenizer_dir
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.masking = MaskingConfig(mask_prob, random_prob, keep_prob, whole_word, span, span_p, max_span)
        self.pack_mode = pack_mode
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle_window = shuffle_window
        self.batches_per_epoch = batches_per_epoch
        self.batch_multiple = batch_multiple
        self.on_error = on_error
        self._rank, self._world_size = rank, world_size
        self.pin_memory = pin_memory
        self.consumed = 0  # micro-batches trained on by this rank since the start of training
        self._handed_out: collections.deque = collections.deque()
        self._train: MaskedBatchStream | None = None
        self._valid: MaskedBatchStream | None = None
        self._placement: tuple[int, int] | None = None

    # -- setup ---------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Data-parallel rank: the Trainer's when attached, else the constructor's."""
        return self.trainer.global_rank if self.trainer is not None else self._rank

    @property
    def world_size(self) -> int:
        """Data-parallel size: the Trainer's when attached, else the constructor's."""
        return self.trainer.world_size if self.trainer is not None else self._world_size

    @property
    def _lightning_counts(self) -> bool:
        # Inside fit, Lightning prefetches one batch; count at transfer time instead of at yield.
        return self.trainer is not None and bool(getattr(self.trainer, "training", False))

    def _stream(self, spec: Any, split: str, mask_stream: int, shuffle: bool) -> MaskedBatchStream:
        tok = load_tokenizer(self.tokenizer_dir)
        shards = resolve_shards(spec, split=split, manifest=self.manifest)
        if shards.tokenizer_hash is not None and shards.tokenizer_hash != tok.hash:
            raise DataError(
                f"{spec}: shards were written with tokenizer {shards.tokenizer_hash}, but {self.tokenizer_dir} is {tok.hash}"
            )
        masker = Masker(
            tok.vocab_size, tok.special_ids, tok.mask_id, self.masking,
            word_start=tok.word_start_table() if (self.masking.whole_word or self.masking.span) else None,
        )
        config = StreamConfig(
            shards=shards, seq_len=self.seq_len, batch_size=self.micro_batch_size, mode=self.pack_mode,
            seed=self.seed, rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
            shuffle_window=self.shuffle_window if shuffle else 1, shuffle_shards=shuffle,
            batches_per_epoch=self.batches_per_epoch if mask_stream == TRAIN_STREAM else None,
            batch_multiple=self.batch_multiple if mask_stream == TRAIN_STREAM else 1,
            mask_stream=mask_stream, expected_hash=tok.hash, vocab_size=tok.vocab_size,
            bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, on_error=self.on_error, stacked=True,
        )
        return MaskedBatchStream(config, masker)

    def setup(self, stage: str | None = None) -> None:
        """Resolve shards, check the tokenizer hash and plan equal epochs (rank/world from the Trainer)."""
        placement = (self.rank, self.world_size)
        if self._placement != placement:  # planned before a Trainer was attached: plan again
            self._train = self._valid = None
            self._placement = placement
        if self._train is None:
            self._train = self._stream(self.train_shards, "train", TRAIN_STREAM, shuffle=True)
        if self.valid_shards is not None and self._valid is None:
            self._valid = self._stream(self.valid_shards, "valid", VALID_STREAM, shuffle=False)

    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            # Batches arrive as numpy (see StreamConfig.stacked); pinning happens when unstacking.
            "pin": self.pin_memory,
            "persistent_workers": False,  # each pass re-forks so workers see the new epoch/cursor
            "prefetch_factor": 4 if self.num_workers else None,
            "worker_init_fn": ignore_requeue_signals if self.num_workers else None,
        }

    def train_dataloader(self) -> DataLoader:
        """The train loader; each pass resumes from :attr:`consumed`."""
        self.setup("fit")
        return _TrainLoader(self, self._train, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """The validation loader: same batches and masks every time."""
        self.setup("validate")
        if self._valid is None:
            return []
        return _ValidLoader(self._valid, **self._loader_kwargs())

    # -- resume --------------------------------------------------------------------------------

    @property
    def batches_per_epoch_per_rank(self) -> int:
        """Train batches per epoch on each rank (equal on all ranks)."""
        self.setup("fit")
        return len(self._train)

    def unused_per_epoch(self) -> dict[str, Any]:
        """What of the train split each epoch leaves unused, for the run summary.

        Ranks take equal steps in whole optimizer steps, so up to one global batch of blocks per
        epoch is not trained on (readers deal their spare blocks to each other; see
        :mod:`data_pipelines.stream`). Plans the train stream if not done yet.

        Returns:
            ``{"blocks", "total_blocks", "tokens", "total_tokens", "exact"}`` per epoch, over all
            ranks: unused blocks of ``seq_len`` tokens, and unused tokens (separators included;
            unused blocks plus each reader's last partial block; ``None`` when only a lower bound
            on blocks is known, as in ``doc`` packing). ``exact`` is False when the block
            counts are lower bounds, so the figures are at least these.
        """
        self.setup("fit")
        plan = self._train.plan
        return {
            "blocks": plan.unused_blocks,
            "total_blocks": sum(plan.reader_blocks),
            "tokens": plan.unused_tokens,
            "total_tokens": plan.total_tokens,
            "exact": plan.exact,
        }

    def skipped_shards(self) -> dict[str, int]:
        """Bad shard reads skipped so far per split (``on_error="skip"``), DataLoader workers included."""
        streams = {"train": self._train, "valid": self._valid}
        return {split: stream.skipped_shards for split, stream in streams.items() if stream is not None}

    def set_consumed(self, micro_batches: int) -> None:
        """Declare how many micro-batches this rank has trained on since the start of training.

        Args:
            micro_batches: the count; the next train loader pass starts right after it.
        """
        if micro_batches < 0:
            raise ValueError(f"micro_batches must be >= 0, got {micro_batches}")
        self.consumed = int(micro_batches)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook, called for the batch about to be trained on: count it as consumed."""
        handed = self._handed_out
        ids = [entry[0] for entry in handed]
        key = _batch_key(batch)
        if key in ids:
            # Entries before it were handed out but never trained on (e.g. an epoch cut short).
            for _ in range(ids.index(key) + 1):
                _, index = handed.popleft()
            self.consumed = index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves in the checkpoint: the consumed count and the settings it assumes."""
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "pack_mode": self.pack_mode,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position; warn when settings changed so the resume is not exact."""
        changed = [
            k for k in ("seed", "seq_len", "micro_batch_size", "num_workers", "world_size", "pack_mode")
            if k in state_dict and state_dict[k] != getattr(self, k)
        ]
        if changed:
            log.warning("data settings changed since the checkpoint (%s): resume continues, but not with the same batches", ", ".join(changed))
        self.consumed = int(state_dict["consumed"])
