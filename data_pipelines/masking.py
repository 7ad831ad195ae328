"""Dynamic MLM masking of a batch, vectorised, and a pure function of (seed, step, rank).

BERT/RoBERTa recipe (RoBERTa §4.1 "dynamic masking"): select ``mask_prob`` (0.15) of the
maskable tokens; of those, 80% become ``<mask>``, 10% a random non-special token, 10% stay. The
model predicts the original id at every selected position (``labels``), and ``-100`` elsewhere.

Strategies (:data:`STRATEGIES`, chosen by name: ``MaskingConfig(strategy=...)``, ``data.masking`` in the config):

* ``token`` (default): each maskable token independently with probability ``mask_prob``;
* ``whole_word``: words (see :meth:`data_pipelines.tokenizer.SpmTokenizer.word_start_table`
  for what a word is: a "▁" piece and its continuation pieces, with whitespace byte pieces such as
  ``<0x0A>``, punctuation pieces and specials each a word on its own) are selected with probability
  ``mask_prob`` and all their pieces are masked together;
* ``span`` (SpanBERT): spans of whole words with geometric lengths (``p = span_p``,
  truncated to ``max_span`` words), laid out over a row's maskable words only and wrapping from
  the row's end to its start, so every word is covered with the same probability; the span
  start rate is solved so that it is ``mask_prob`` (no loss at row ends or specials). The
  80/10/10 decision is made once per span — a maximal run of selected pieces (spans that touch
  or overlap merge into one) is all ``<mask>``, all random tokens, or all kept.

A strategy only selects: it returns which positions are predicted and the uniform draw that decides ``<mask>`` /
random / keep for each (:class:`Strategy`); :class:`Masker` does the rest. To add one, write its selection
function and list it in :data:`STRATEGIES`; the config's choice (:class:`MaskingStrategy`) follows from it.

Specials (``<s> <pad> </s> <unk> <mask>``) are never selected. Everything is a handful of tensor
ops over the batch, no Python loop over tokens; randomness comes only from the ``torch.Generator``
passed in, which :func:`mask_generator` seeds from (seed, step, rank), so a resumed run draws the
same masks.
"""

from __future__ import annotations

import enum
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_pipelines.contract import IGNORE_INDEX
from data_pipelines.tokenizer import ENDS_WORD, STARTS_WORD


@dataclass(frozen=True)
class MaskingConfig:
    """How to mask.

    Attributes:
        mask_prob: fraction of maskable tokens selected for prediction (BERT: 0.15).
        random_prob: fraction of selected tokens replaced by a random token (BERT: 0.1).
        keep_prob: fraction of selected tokens left unchanged (BERT: 0.1); the rest get ``<mask>``.
        strategy: what is selected, a name of :data:`STRATEGIES`: ``"token"``, ``"whole_word"`` or ``"span"``
            (a :class:`MaskingStrategy` member is taken as its name).
        span_p: parameter of the geometric span length (SpanBERT: 0.2, mean ≈ 3.8 words clipped).
        max_span: longest span in words (SpanBERT: 10).
    """

    mask_prob: float = 0.15
    random_prob: float = 0.1
    keep_prob: float = 0.1
    strategy: str = "token"
    span_p: float = 0.2
    max_span: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.random_prob < 0 or self.keep_prob < 0 or self.random_prob + self.keep_prob > 1:
            raise ValueError(f"random_prob + keep_prob must be within [0, 1], got {self.random_prob} + {self.keep_prob}")
        name = getattr(self.strategy, "value", self.strategy)  # the config's Enum member, or its name
        if name not in STRATEGIES:
            raise ValueError(f"masking strategy {name!r} is not one of {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategy", str(name))
        if STRATEGIES[name].check is not None:
            STRATEGIES[name].check(self)

    @property
    def needs_words(self) -> bool:
        """Whether the strategy selects whole words: the :class:`Masker` then needs the tokenizer's word table."""
        return STRATEGIES[self.strategy].words


def mask_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit generator seed that depends on every argument (SeedSequence mixing).

    Args:
        seed: the run's seed.
        step: global micro-batch index (training), or batch index (validation).
        rank: the data-parallel rank.
        stream: separates independent uses (0 = training masks, 1 = validation masks).

    Returns:
        A non-negative int for ``torch.Generator.manual_seed``.
    """
    words = np.random.SeedSequence([seed, stream, step, rank]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def mask_generator(seed: int, step: int, rank: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`mask_seed`."""
    return torch.Generator().manual_seed(mask_seed(seed, step, rank, stream))


@functools.lru_cache(maxsize=4096)  # a mask-rate schedule asks for a new rate every micro-batch
def span_start_rate(mask_prob: float, span_p: float, max_span: int) -> float:
    """The per-word span start probability that covers ``mask_prob`` of the words of a ring.

    With starts independent per word and lengths ``L`` truncated-geometric, a word is covered
    unless none of the ``max_span`` words up to it starts a span reaching it:
    ``1 - prod_{k<max_span} (1 - rate * P(L > k)) = mask_prob``, solved by bisection.
    """
    lengths = np.arange(1, max_span + 1)
    probs = span_p * (1 - span_p) ** (lengths - 1)
    probs /= probs.sum()
    reach = probs[::-1].cumsum()[::-1]  # P(L > k) for k = 0..max_span-1
    low, high = 0.0, 1.0
    for _ in range(60):
        rate = (low + high) / 2
        if 1 - np.prod(1 - rate * reach) < mask_prob:
            low = rate
        else:
            high = rate
    return (low + high) / 2


class MaskSchedule:
    """A mask rate that falls during training (Ankner et al., 2023, "Dynamic Masking Rate Schedules for MLM
    Pretraining": 30% -> 15% linearly beat a constant 15%), as a function of the training micro-batch index
    only, so a resumed run masks exactly as the uninterrupted one.

    The rate is ``start`` for micro-batches ``< hold`` (the LR warm-up), then falls linearly to ``end`` at
    micro-batch ``horizon`` (the end of training) and stays there. A time-budgeted run learns its horizon
    only after it has measured its step rate, inside the warm-up: the horizon lives in shared memory, so
    DataLoader workers started before it was fixed see it, and a worker that reaches ``hold`` before the
    trainer has published it waits for it rather than guess (every batch past ``hold`` is masked with the
    fixed horizon, whenever the workers were started).

    Args:
        start: the rate at the start (Ankner et al.: 0.3).
        end: the rate at ``horizon`` (0.15, RoBERTa's; validation always masks at this rate).
        hold: micro-batches per rank at ``start`` (the warm-up); the horizon must be fixed before them.
        horizon: micro-batches per rank at which ``end`` is reached; None: fixed later (:meth:`set_horizon`).
        wait_seconds: how long a worker waits for the horizon before it stops with an error.
    """

    def __init__(self, start: float, end: float, hold: int, horizon: int | None = None,
                 wait_seconds: float = 1800.0) -> None:
        for name, rate in (("start", start), ("end", end)):
            if not 0.0 < rate < 1.0:
                raise ValueError(f"mask schedule {name}={rate}: must be in (0, 1)")
        if hold < 0:
            raise ValueError(f"mask schedule hold={hold}: must be >= 0")
        self.start, self.end, self.hold, self.wait_seconds = start, end, hold, wait_seconds
        # Shared memory: written by the trainer's process, read by the DataLoader workers (fork or spawn).
        self._horizon = torch.zeros(1, dtype=torch.int64).share_memory_()
        if horizon is not None:
            self.set_horizon(horizon)

    @property
    def horizon(self) -> int | None:
        """Micro-batches per rank at which the rate reaches ``end``; None until fixed."""
        value = int(self._horizon[0])
        return value if value > 0 else None

    def set_horizon(self, micro_batches: int) -> None:
        """Fix the horizon (once a time budget has fixed ``max_steps``, or from a resumed checkpoint)."""
        self._horizon[0] = max(int(micro_batches), self.hold + 1)

    def rate(self, step: int) -> float:
        """The mask rate of training micro-batch ``step`` (0-based, per rank)."""
        if step < self.hold:
            return self.start
        horizon, deadline = self.horizon, time.monotonic() + self.wait_seconds
        if horizon is None and get_worker_info() is None:  # the trainer's own process: no one to wait for
            raise RuntimeError(f"mask schedule: micro-batch {step} is past the warm-up ({self.hold} micro-batches) "
                               f"but the schedule's horizon was not fixed; a time budget fixes it inside the warm-up")
        while horizon is None:  # a budget run measures its rate inside the warm-up: only a worker ahead waits
            if time.monotonic() > deadline:
                raise RuntimeError(f"mask schedule: micro-batch {step} needs the schedule's horizon, which the trainer "
                                   f"had not fixed after {self.wait_seconds:.0f} s; lengthen optim.warmup_steps")
            time.sleep(0.01)
            horizon = self.horizon
        progress = min(1.0, (step - self.hold) / max(1, horizon - self.hold))
        return self.start + (self.end - self.start) * progress


# ---------------------------------------------------------------------------------------------
# Strategies: which positions a batch predicts
# ---------------------------------------------------------------------------------------------


# (masker, input_ids [B, T], maskable [B, T], generator, rate) -> (selected [B, T] bool, action [B, T] in [0, 1))
Select = Callable[["Masker", torch.Tensor, torch.Tensor, torch.Generator, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Strategy:
    """A masking strategy: how the positions a batch predicts are selected.

    Attributes:
        name: its name in :data:`STRATEGIES` (and in the config: ``data.masking``).
        select: ``(masker, input_ids, maskable, generator, rate) -> (selected, action)``: which positions are
            predicted (``[B, T]`` bools, only where ``maskable``, about ``rate`` of them), and per position a
            uniform draw in [0, 1) that decides ``<mask>`` / random / keep where selected. Every random number
            comes from ``generator``.
        words: it selects words, so the :class:`Masker` needs the tokenizer's word table (``masker.word_starts``).
        check: refuses a :class:`MaskingConfig` this strategy cannot use (a ``ValueError``); None: no check.
    """

    name: str
    select: Select
    words: bool = False
    check: Callable[[MaskingConfig], None] | None = None


def select_tokens(masker: "Masker", input_ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator,
                  rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's: each maskable token with probability ``rate``; one draw per position decides its 80/10/10."""
    selected = (torch.rand(input_ids.shape, generator=generator) < rate) & maskable
    return selected, torch.rand(input_ids.shape, generator=generator)


def select_whole_words(masker: "Masker", input_ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator,
                       rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each word with probability ``rate``, all its pieces together; one draw per position decides its 80/10/10."""
    starts, word = masker.word_index(input_ids)
    chosen_start = starts & maskable & (torch.rand(input_ids.shape, generator=generator) < rate)
    # Spread each word's decision (made at its first piece) to all its pieces.
    chosen_word = torch.zeros(input_ids.shape, dtype=torch.int32)
    chosen_word.scatter_add_(1, word, chosen_start.to(torch.int32))
    selected = (chosen_word.gather(1, word) > 0) & maskable
    return selected, torch.rand(input_ids.shape, generator=generator)


def select_spans(masker: "Masker", input_ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator,
                 rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SpanBERT spans: each maskable word starts a span with probability ``span_rate``.

    Spans are laid out over the row's maskable words only (a special is skipped, never counted
    in a span's length nor started on), and a span that runs off the end of the row continues
    at its first maskable word. On that ring every word is covered with the same probability,
    ``1 - prod_k (1 - span_rate * P(len > k))``, which ``span_rate`` is solved for, so the
    expected masked fraction is ``rate`` on every row — no loss at row ends or specials. One draw
    per span (a maximal run of selected pieces) decides its 80/10/10.
    """
    cfg = masker.config
    shape = input_ids.shape
    span_rate = span_start_rate(rate, cfg.span_p, cfg.max_span)
    starts = masker.word_starts(input_ids) & maskable
    word = torch.cumsum(starts, dim=1) - 1  # index among the row's maskable words
    num_words = word[:, -1:] + 1
    word.clamp_(min=0)  # a special before the first word; masked out below
    begin = starts & (torch.rand(shape, generator=generator) < span_rate)
    u = torch.rand(shape, generator=generator)
    # Truncated geometric lengths in words by inverse CDF: L = 1 + floor(log(1 - u * F(k)) / log(1 - p))
    # (span_p = 1: log_q = -inf, length 1).
    cdf_max = 1.0 - (1.0 - cfg.span_p) ** cfg.max_span
    log_q = math.log1p(-cfg.span_p) if cfg.span_p < 1.0 else -math.inf
    span_len = torch.floor_(torch.log1p(u.mul_(-cdf_max)).div_(log_q)).clamp_(max=cfg.max_span - 1)
    end = word + 1 + span_len.long()
    wrapped = begin & (end > num_words)
    # Coverage in word space via a difference array: +1 at the first word, -1 after the last;
    # a wrapped span ends at end - num_words and starts again at word 0.
    ones = begin.to(torch.int32)
    delta = torch.zeros(shape[0], shape[1] + cfg.max_span + 1, dtype=torch.int32)
    delta.scatter_add_(1, word, ones)
    delta.scatter_add_(1, torch.where(wrapped, end - num_words, end), -ones)
    delta[:, 0] += wrapped.sum(1, dtype=torch.int32)
    covered_word = torch.cumsum(delta, dim=1)[:, : shape[1]] > 0
    selected = covered_word.gather(1, word) & maskable
    # One uniform draw per span (a maximal run of selected pieces) decides <mask> / random / keep.
    run_start = selected.clone()
    run_start[:, 1:] &= ~selected[:, :-1]
    run = (torch.cumsum(run_start, dim=1) - 1).clamp_(min=0)
    return selected, torch.rand(shape, generator=generator).gather(1, run)


def check_spans(config: MaskingConfig) -> None:
    """Span lengths need ``0 < span_p <= 1`` and ``max_span >= 1``."""
    if not (0.0 < config.span_p <= 1.0 and config.max_span >= 1):
        raise ValueError(f"span masking needs 0 < span_p <= 1 and max_span >= 1, got {config.span_p}, {config.max_span}")


# Every strategy, by name: the one list a new strategy joins.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("token", select_tokens),
    Strategy("whole_word", select_whole_words, words=True),
    Strategy("span", select_spans, words=True, check=check_spans),
)}

# The config's typed choice (``data.masking``), generated from the registry: a misspelt name fails when the config
# is composed, naming these. A str Enum, so a member equals its name.
MaskingStrategy = enum.Enum("MaskingStrategy", {name: name for name in STRATEGIES}, type=str)


class Masker:
    """Applies :class:`MaskingConfig` to batches of token ids.

    Args:
        vocab_size: number of ids.
        special_ids: ids never masked nor drawn as random replacements.
        mask_id: id of ``<mask>``.
        config: the masking recipe.
        word_start: the table of :meth:`data_pipelines.tokenizer.SpmTokenizer.word_start_table`
            (``uint8`` flags ``STARTS_WORD | ENDS_WORD`` per id), or a boolean table of word
            starts only; needed by the strategies that select words (``config.needs_words``).
    """

    def __init__(
        self,
        vocab_size: int,
        special_ids: tuple[int, ...],
        mask_id: int,
        config: MaskingConfig = MaskingConfig(),
        word_start: np.ndarray | None = None,
        schedule: MaskSchedule | None = None,
    ) -> None:
        self.config = config
        self.schedule = schedule
        self.mask_id = mask_id
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[list(special_ids)] = True
        self.special = special
        # Random replacements come from ordinary tokens only, so "random" never injects <s> or <pad>.
        self.replacement_ids = torch.nonzero(~special).flatten()
        self.strategy = STRATEGIES[config.strategy]
        if self.strategy.words:
            if word_start is None:
                raise ValueError(f"{config.strategy} masking needs the word_start table")
            flags = np.asarray(word_start)
            if flags.dtype == bool:
                flags = flags.astype(np.uint8) * STARTS_WORD
            self.word_start = torch.as_tensor((flags & STARTS_WORD) != 0) | special
            # The piece after one of these starts a new word (a special too: a block may begin mid-word).
            self.word_end = torch.as_tensor((flags & ENDS_WORD) != 0) | special
        else:
            self.word_start = self.word_end = None

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator,
                 step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a batch.

        Args:
            input_ids: LongTensor ``[B, T]`` of original ids (padding included).
            generator: the only source of randomness.
            step: the training micro-batch index, which a :class:`MaskSchedule` maps to the rate (None, or
                no schedule: ``config.mask_prob``).

        Returns:
            ``(masked_input_ids, labels)``: both ``[B, T]`` LongTensors; labels hold the original
            id where a token was selected and ``-100`` elsewhere.
        """
        cfg = self.config
        rate = self.schedule.rate(step) if self.schedule is not None and step is not None else cfg.mask_prob
        maskable = ~self.special[input_ids]
        selected, action = self.strategy.select(self, input_ids, maskable, generator, rate)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        to_mask = selected & (action < 1.0 - cfg.random_prob - cfg.keep_prob)
        to_random = selected & (action >= 1.0 - cfg.random_prob - cfg.keep_prob) & (action < 1.0 - cfg.keep_prob)
        masked = input_ids.masked_fill(to_mask, self.mask_id)
        picks = torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator)
        masked = torch.where(to_random, self.replacement_ids[picks], masked)
        return masked, labels

    def word_starts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per position: whether it starts a word (strategies with ``words=True`` only)."""
        starts = self.word_start[input_ids]
        # A piece right after a word-on-its-own (newline, punctuation, special) starts a word too.
        starts[:, 1:] |= self.word_end[input_ids[:, :-1]]
        starts[:, 0] = True
        return starts

    def word_index(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: whether it starts a word, and the index of its word within the row."""
        starts = self.word_starts(input_ids)
        return starts, torch.cumsum(starts, dim=1) - 1
