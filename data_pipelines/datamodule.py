"""``MLMDataModule``: masked MLM batches for Lightning, with equal batches per rank and exact resume.

Usage::

    dm = MLMDataModule("data/shards", "data/tokenizer", valid_shards="data/shards",
                       masking=MaskingConfig(strategy="whole_word"), settings=DataSettings(num_workers=4))
    dm.connect(seq_len=512, micro_batch_size=16, accumulation=4)  # the trainer's batch plan, given once
    trainer.fit(module, datamodule=dm)

What is read and how it is masked come as objects (:class:`DataSettings`, :class:`~data_pipelines.masking.MaskingConfig`,
built once from a run's config); the batch shape and the trainer's accumulation come once, through :meth:`MLMDataModule.connect`
(litgpt's ``data.connect(tokenizer, batch_size, max_seq_length)``), and everything the data side derives from them
(the epoch rounded to whole optimizer steps, the step windows) follows from that one call.

Batches are ``{"input_ids", "attention_mask", "labels"}`` LongTensors ``[B, T]``, plus ``"document_ids"`` with
``pack_mode="packed_docs"`` (see :mod:`data_pipelines.stream`).

Resume. The whole data position is one number: ``consumed``, the micro-batches this rank has
trained on since the start of training. ``state_dict()`` saves it and Lightning stores it in the
checkpoint; ``load_state_dict()`` restores it, and the next train loader iteration starts at
epoch ``consumed // len(loader)``, batch ``consumed % len(loader)`` — the same token blocks and
the same masks (masks are seeded by (seed, step=global micro-batch index, rank)). A checkpoint written
under another plan (world size, workers, micro-batch, accumulation) is re-planned (:meth:`MLMDataModule.replan`):
the rest of its epoch is dealt to this run's readers as the epoch's last batches, and ``consumed`` becomes
this plan's position (``epoch * len + first carried batch``), no longer a count of batches trained.

Counting is automatic inside a Lightning ``fit``: the train loader (:mod:`data_pipelines.loaders`) records each
batch it hands out, and this DataModule's ``on_before_batch_transfer`` hook — which Lightning calls for the batch
about to be trained on, after its one-batch prefetch — advances ``consumed`` when that batch is
really used. Outside Lightning (a plain loop), every batch taken from the iterator counts.
A training module that consumes batches some other way can call :meth:`MLMDataModule.set_consumed`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import typing
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data_pipelines.epochs import Carry, plan_epoch, rest_of_epoch
from data_pipelines.errors import DataError, OnError, check_on_error
from data_pipelines.loaders import TrainLoader, ValidLoader, batch_key, batch_multiple, loader_options
from data_pipelines.manifest import resolve_shards
from data_pipelines.masking import Masker, MaskingConfig, MaskSchedule
from data_pipelines.packing import PackMode
from data_pipelines.stream import TRAIN_STREAM, VALID_STREAM, MaskedBatchStream, StreamConfig
from data_pipelines.tokenizer import load_tokenizer

log = logging.getLogger("data_pipelines")

PACK_MODES = typing.get_args(PackMode)  # ("full_sentences", "doc", "packed_docs")
_LEGACY_PACK_MODES = {"full": "full_sentences"}  # checkpoints from before the stream took the YAML's name


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """How the streams are read: everything but the masking (:class:`~data_pipelines.masking.MaskingConfig`) and the
    batch shape (:meth:`MLMDataModule.connect`). Built once from a run's config.

    Attributes:
        pack_mode: ``"full_sentences"`` (FULL-SENTENCES, crosses documents, no padding), ``"doc"`` (one document a
            row, padded) or ``"packed_docs"`` (documents packed with their boundaries, no padding; batches carry
            ``document_ids`` for attention within each document).
        seed: seed of shard assignment, order, shuffle and masks.
        num_workers: DataLoader workers per rank (0 reads in the main process).
        shuffle_window: blocks shuffled together in the train stream.
        on_error: ``"raise"`` or ``"skip"`` (counted warning) for bad shards.
        pin_memory: pin batches for faster host-to-GPU copies.
        batches_per_epoch: train batches per rank per epoch; ``None`` (default) derives the exact equal count
            from the manifest.
    """

    pack_mode: PackMode = "full_sentences"
    seed: int = 0
    num_workers: int = 0
    shuffle_window: int = 1024
    on_error: OnError = "raise"
    pin_memory: bool = False
    batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check_on_error(self.on_error)
        if self.pack_mode not in PACK_MODES:
            raise DataError(f"pack_mode must be one of {', '.join(PACK_MODES)}; got {self.pack_mode!r}")
        if self.num_workers < 0:
            raise DataError(f"need num_workers >= 0, got {self.num_workers}")


class MLMDataModule(L.LightningDataModule):
    """Streams masked-LM batches from WebDataset shards.

    Args:
        train_shards: shard directory, ``manifest.json``, brace pattern, ``pipe:`` URL or a list.
        tokenizer_dir: directory written by ``roberta-pl-data tokenizer``.
        valid_shards: like ``train_shards``, for validation (``None``: no validation loader).
            A directory means its manifest's ``valid`` split.
        manifest: manifest giving counts/hash for shards passed as patterns or ``pipe:`` URLs.
        masking: how batches are masked (validation always at ``masking.mask_prob``).
        settings: how the streams are read (packing, seed, workers, shuffle window, bad shards).
        mask_schedule: a :class:`~data_pipelines.masking.MaskSchedule` for the training mask rate
            (validation keeps ``masking.mask_prob``).
        rank: data-parallel rank when no Trainer is attached.
        world_size: data-parallel size when no Trainer is attached.

    The batch shape and the trainer's accumulation are given once, by :meth:`connect`, before the first loader.
    """

    def __init__(
        self,
        train_shards: str | os.PathLike | Sequence[str],
        tokenizer_dir: str | os.PathLike,
        *,
        valid_shards: str | os.PathLike | Sequence[str] | None = None,
        manifest: str | os.PathLike | None = None,
        masking: MaskingConfig = MaskingConfig(),
        settings: DataSettings = DataSettings(),
        mask_schedule: MaskSchedule | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.train_shards = train_shards
        self.valid_shards = valid_shards
        self.manifest = manifest
        self.tokenizer_dir = tokenizer_dir
        self.masking = masking
        self.settings = settings
        self.mask_schedule = mask_schedule
        self._rank, self._world_size = rank, world_size
        self._shape: tuple[int, int, int | list[tuple[int, int, int]]] | None = None  # see connect
        self.consumed = 0  # the data position: micro-batches of this rank's plan, epoch * len + batch (see resume)
        self._carry: Carry | None = None  # the rest of an epoch begun under another plan (see replan)
        self.replanned = False  # load_state_dict re-planned a checkpoint written under another plan
        self._handed_out: collections.deque = collections.deque()
        self._train: MaskedBatchStream | None = None
        self._valid: MaskedBatchStream | None = None
        self._placement: tuple[int, int] | None = None

    def connect(self, seq_len: int, micro_batch_size: int,
                accumulation: int | Sequence[Sequence[int]] = 1) -> "MLMDataModule":
        """Give the data side the trainer's batch plan, once, before the first loader (litgpt's ``connect``).

        Args:
            seq_len: tokens per sequence, including ``<s>`` and ``</s>``.
            micro_batch_size: sequences per batch on each rank.
            accumulation: micro-batches per optimizer step on each rank, or a batch ramp's phases
                ``(start_step, start_micro_batch, accumulation)`` (``roberta_pl.optim.BatchPlan.phases``). The train
                loader tags each batch with its step's masked-token count (:class:`~data_pipelines.loaders.StepWindow`), and each epoch
                holds whole optimizer steps (:func:`~data_pipelines.loaders.batch_multiple`), so every optimizer step, epoch ends included,
                sums the same number of micro-batches; it must be the plan the trainer steps by.
        Returns:
            This DataModule, so that building and connecting can be one expression.
        """
        acc = accumulation if isinstance(accumulation, int) else [tuple(int(x) for x in p) for p in accumulation]
        phases = [(0, 0, acc)] if isinstance(acc, int) else acc
        if seq_len < 3 or micro_batch_size < 1 or not phases or min(p[2] for p in phases) < 1:
            raise DataError(f"need seq_len >= 3, micro_batch_size >= 1, accumulation >= 1; got {seq_len}, "
                            f"{micro_batch_size}, {accumulation}")
        self._shape = (int(seq_len), int(micro_batch_size), acc)
        self._train = self._valid = None  # planned again with this shape
        return self

    def _connected(self) -> tuple[int, int, int | list[tuple[int, int, int]]]:
        if self._shape is None:
            raise DataError("MLMDataModule has no batch shape: call connect(seq_len, micro_batch_size, accumulation) "
                            "before its loaders are used")
        return self._shape

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (from :meth:`connect`)."""
        return self._connected()[0]

    @property
    def micro_batch_size(self) -> int:
        """Sequences per batch on each rank (from :meth:`connect`)."""
        return self._connected()[1]

    @property
    def accumulation(self) -> int | list[tuple[int, int, int]]:
        """Micro-batches per optimizer step on each rank, or the ramp's phases (from :meth:`connect`)."""
        return self._connected()[2]

    @property
    def batch_multiple(self) -> int:
        """Train batches per epoch are a multiple of this: whole optimizer steps in every phase of the accumulation."""
        return batch_multiple(self.accumulation)

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
            word_start=tok.word_start_table() if self.masking.needs_words else None,
            schedule=self.mask_schedule if mask_stream == TRAIN_STREAM else None,
        )
        d, train = self.settings, mask_stream == TRAIN_STREAM
        config = StreamConfig(
            shards=shards, seq_len=self.seq_len, batch_size=self.micro_batch_size, pack_mode=d.pack_mode,
            seed=d.seed, rank=self.rank, world_size=self.world_size, num_workers=d.num_workers,
            shuffle_window=d.shuffle_window if shuffle else 1, shuffle_shards=shuffle,
            batches_per_epoch=d.batches_per_epoch if train else None,
            batch_multiple=self.batch_multiple if train else 1,
            mask_stream=mask_stream, expected_hash=tok.hash, vocab_size=tok.vocab_size,
            bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, on_error=d.on_error, stacked=True,
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
            self._train.set_carry(self._carry)
        if self.valid_shards is not None and self._valid is None:
            self._valid = self._stream(self.valid_shards, "valid", VALID_STREAM, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """The train loader; each pass resumes from :attr:`consumed`."""
        self.setup("fit")
        return TrainLoader(self, self._train, **loader_options(self.settings.num_workers, self.settings.pin_memory))

    def val_dataloader(self) -> DataLoader:
        """The validation loader: same batches and masks every time."""
        self.setup("validate")
        if self._valid is None:
            return []
        return ValidLoader(self._valid, **loader_options(self.settings.num_workers, self.settings.pin_memory))

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
        key = batch_key(batch)
        if key in ids:
            # Entries before it were handed out but never trained on (e.g. an epoch cut short).
            for _ in range(ids.index(key) + 1):
                _, index = handed.popleft()
            self.consumed = index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves in the checkpoint: the data position, the settings it assumes, and the carried
        rest of an epoch while this run is still finishing one begun under another plan (``None`` otherwise)."""
        carry = self._carry
        if carry is not None and self.consumed >= (carry.epoch + 1) * self.batches_per_epoch_per_rank:
            carry = None  # that epoch is done
        return {
            "consumed": self.consumed,
            "seed": self.settings.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "num_workers": self.settings.num_workers,
            "world_size": self.world_size,
            "pack_mode": self.settings.pack_mode,
            "interleave_shards": StreamConfig.interleave_shards,
            "batch_multiple": self.batch_multiple,
            "carry": carry.to_dict() if carry is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position. A checkpoint written under another plan (world size, workers, micro-batch
        size or accumulation) is re-planned: the rest of its epoch is dealt to this run's readers (one INFO
        line says how; see :meth:`replan`). Other changed settings (seed, seq_len, packing) make different
        blocks: a warning says the resume continues, but not with the same batches."""
        consumed = int(state_dict["consumed"])
        carry = Carry.from_dict(state_dict["carry"]) if state_dict.get("carry") else None
        self.replanned = False
        blocks = {"seed": self.settings.seed, "seq_len": self.seq_len, "pack_mode": self.settings.pack_mode,
                  "interleave_shards": StreamConfig.interleave_shards}
        written = dict(state_dict)
        written.setdefault("interleave_shards", 1)  # checkpoints from before readers interleaved shards read one at a time
        if "pack_mode" in written:
            written["pack_mode"] = _LEGACY_PACK_MODES.get(written["pack_mode"], written["pack_mode"])
        changed = [k for k, v in blocks.items() if k in written and written[k] != v]
        if changed:
            log.warning("data settings changed since the checkpoint (%s): resume continues, but not with the same batches", ", ".join(changed))
            self.consumed, self._carry = consumed, None
            return
        # Checkpoints from before batch_multiple was saved: the global batch is the same, so the accumulation
        # scales inversely with world size x micro-batch.
        saved_world = int(state_dict.get("world_size", self.world_size))
        saved_micro = int(state_dict.get("micro_batch_size", self.micro_batch_size))
        default_multiple = max(1, self.batch_multiple * self.world_size * self.micro_batch_size // (saved_world * saved_micro))
        workers = self.settings.num_workers
        saved = {"world_size": saved_world, "num_workers": int(state_dict.get("num_workers", workers)),
                 "batch_size": saved_micro, "batch_multiple": int(state_dict.get("batch_multiple", default_multiple))}
        here = {"world_size": self.world_size, "num_workers": workers, "batch_size": self.micro_batch_size,
                "batch_multiple": self.batch_multiple}
        if saved == here:
            self.consumed, self._carry = consumed, carry
            if self._train is not None:
                self._train.set_carry(carry)
            return
        self.replan(consumed, saved, carry)

    def replan(self, consumed: int, saved: dict[str, int], carry: Carry | None = None) -> None:
        """Continue from data position ``consumed`` reached under another plan: finish its epoch with exactly
        the blocks that plan's readers had not trained on, dealt to this run's readers in whole optimizer steps
        (less than one global batch of them may be left over), then follow this run's plan.

        Args:
            consumed: the saved data position (a rank's micro-batches, ``epoch * len + batch``, under that plan).
            saved: that plan's ``world_size``, ``num_workers``, ``batch_size`` (micro-batch) and ``batch_multiple``.
            carry: the carry that plan was itself finishing, if any (from the checkpoint).
        """
        if not isinstance(self.accumulation, int) and len(self.accumulation) > 1:
            raise DataError("batch.ramp: a resume on another world size, worker count or micro-batch size is not "
                            "supported under a batch ramp (its phases count micro-batches of the old plan); resume "
                            "with the checkpoint's settings or drop the ramp")
        self.setup("fit")
        stream = self._train
        old = dataclasses.replace(stream.config, rank=0, **saved)
        rest = rest_of_epoch(old, consumed, carry)
        first = stream.set_carry(rest)
        per_epoch = len(stream)
        epoch = rest.epoch if rest is not None else consumed // plan_epoch(old).batches_per_rank
        self.consumed, self._carry, self.replanned = epoch * per_epoch + first, rest, True
        if self.rank != 0:
            return
        where = (f"{saved['world_size']} rank(s) x {max(1, saved['num_workers'])} reader(s), micro-batch {saved['batch_size']}, "
                 f"accumulation {saved['batch_multiple']}")
        now = (f"{self.world_size} x {max(1, self.settings.num_workers)}, micro-batch {self.micro_batch_size}, accumulation "
               f"{self.batch_multiple}")
        if rest is None:
            log.info("data: re-planned for this run (the checkpoint's plan was %s; now %s): resuming at the start of "
                     "epoch %d under the new plan", where, now, epoch)
            return
        if first == per_epoch:
            log.info("data: re-planned for this run (the checkpoint's plan was %s; now %s): the %d blocks of epoch %d its "
                     "readers had not trained on fill no optimizer step on every rank and go unused; resuming at the "
                     "start of epoch %d under the new plan", where, now, rest.blocks, epoch, epoch + 1)
            return
        log.info("data: re-planned for this run (the checkpoint's plan was %s; now %s): the %d blocks of epoch %d its "
                 "readers had not trained on are re-dealt to this run's readers as batches %d-%d of the epoch on each "
                 "rank; %d of them (less than one global batch) go unused; later epochs follow the new plan",
                 where, now, rest.blocks, epoch, first, per_epoch - 1, stream.carry_left)
