"""Dynamic MLM masking of a batch, vectorised, and a pure function of (seed, step, rank).

BERT/RoBERTa recipe (RoBERTa §4.1 "dynamic masking"): select ``mask_prob`` (0.15) of the
maskable tokens; of those, 80% become ``<mask>``, 10% a random non-special token, 10% stay. The
model predicts the original id at every selected position (``labels``), and ``-100`` elsewhere.

Selection units:

* token (default): each maskable token independently with probability ``mask_prob``;
* whole word (``whole_word=True``): words (see :meth:`data_pipelines.tokenizer.SpmTokenizer.word_start_table`
  for what a word is: a "▁" piece and its continuation pieces, with whitespace byte pieces such as
  ``<0x0A>``, punctuation pieces and specials each a word on its own) are selected with probability
  ``mask_prob`` and all their pieces are masked together;
* span (``span=True``, SpanBERT): spans of whole words with geometric lengths (``p = span_p``,
  truncated to ``max_span`` words), laid out over a row's maskable words only and wrapping from
  the row's end to its start, so every word is covered with the same probability; the span
  start rate is solved so that it is ``mask_prob`` (no loss at row ends or specials). The
  80/10/10 decision is made once per span — a maximal run of selected pieces (spans that touch
  or overlap merge into one) is all ``<mask>``, all random tokens, or all kept.

Specials (``<s> <pad> </s> <unk> <mask>``) are never selected. Everything is a handful of tensor
ops over the batch, no Python loop over tokens; randomness comes only from the ``torch.Generator``
passed in, which :func:`mask_generator` seeds from (seed, step, rank), so a resumed run draws the
same masks.
"""

from __future__ import annotations

import functools
import math
import time
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
        whole_word: select whole words instead of single pieces.
        span: select SpanBERT spans of whole words (implies word units).
        span_p: parameter of the geometric span length (SpanBERT: 0.2, mean ≈ 3.8 words clipped).
        max_span: longest span in words (SpanBERT: 10).
    """

    mask_prob: float = 0.15
    random_prob: float = 0.1
    keep_prob: float = 0.1
    whole_word: bool = False
    span: bool = False
    span_p: float = 0.2
    max_span: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.random_prob < 0 or self.keep_prob < 0 or self.random_prob + self.keep_prob > 1:
            raise ValueError(f"random_prob + keep_prob must be within [0, 1], got {self.random_prob} + {self.keep_prob}")
        if self.span and not (0.0 < self.span_p <= 1.0 and self.max_span >= 1):
            raise ValueError(f"span masking needs 0 < span_p <= 1 and max_span >= 1, got {self.span_p}, {self.max_span}")


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


class Masker:
    """Applies :class:`MaskingConfig` to batches of token ids.

    Args:
        vocab_size: number of ids.
        special_ids: ids never masked nor drawn as random replacements.
        mask_id: id of ``<mask>``.
        config: the masking recipe.
        word_start: the table of :meth:`data_pipelines.tokenizer.SpmTokenizer.word_start_table`
            (``uint8`` flags ``STARTS_WORD | ENDS_WORD`` per id), or a boolean table of word
            starts only; needed for whole-word and span masking.
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
        if config.whole_word or config.span:
            if word_start is None:
                raise ValueError("whole-word and span masking need the word_start table")
            flags = np.asarray(word_start)
            if flags.dtype == bool:
                flags = flags.astype(np.uint8) * STARTS_WORD
            self.word_start = torch.as_tensor((flags & STARTS_WORD) != 0) | special
            # The piece after one of these starts a new word (a special too: a block may begin mid-word).
            self.word_end = torch.as_tensor((flags & ENDS_WORD) != 0) | special
        else:
            self.word_start = self.word_end = None
        if config.span:
            p, k = config.span_p, config.max_span
            # Truncated geometric lengths by inverse CDF: L = 1 + floor(log(1 - u * F(k)) / log(1 - p)).
            self._span_cdf_max = 1.0 - (1.0 - p) ** k
            self._span_log_q = math.log1p(-p) if p < 1.0 else -math.inf

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
        if cfg.span:
            selected = self._select_spans(input_ids, maskable, generator, rate)
            # One uniform draw per span (a maximal run of selected pieces) decides <mask> / random / keep.
            run_start = selected.clone()
            run_start[:, 1:] &= ~selected[:, :-1]
            run = (torch.cumsum(run_start, dim=1) - 1).clamp_(min=0)
            action = torch.rand(input_ids.shape, generator=generator).gather(1, run)
        else:
            if cfg.whole_word:
                selected = self._select_words(input_ids, maskable, generator, rate)
            else:
                selected = (torch.rand(input_ids.shape, generator=generator) < rate) & maskable
            # One uniform draw per position decides <mask> / random / keep for the selected ones.
            action = torch.rand(input_ids.shape, generator=generator)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        to_mask = selected & (action < 1.0 - cfg.random_prob - cfg.keep_prob)
        to_random = selected & (action >= 1.0 - cfg.random_prob - cfg.keep_prob) & (action < 1.0 - cfg.keep_prob)
        masked = input_ids.masked_fill(to_mask, self.mask_id)
        picks = torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator)
        masked = torch.where(to_random, self.replacement_ids[picks], masked)
        return masked, labels

    def _word_starts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per position: whether it starts a word."""
        starts = self.word_start[input_ids]
        # A piece right after a word-on-its-own (newline, punctuation, special) starts a word too.
        starts[:, 1:] |= self.word_end[input_ids[:, :-1]]
        starts[:, 0] = True
        return starts

    def _word_index(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: whether it starts a word, and the index of its word within the row."""
        starts = self._word_starts(input_ids)
        return starts, torch.cumsum(starts, dim=1) - 1

    def _select_words(self, input_ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator,
                      rate: float) -> torch.Tensor:
        starts, word = self._word_index(input_ids)
        chosen_start = starts & maskable & (torch.rand(input_ids.shape, generator=generator) < rate)
        # Spread each word's decision (made at its first piece) to all its pieces.
        chosen_word = torch.zeros(input_ids.shape, dtype=torch.int32)
        chosen_word.scatter_add_(1, word, chosen_start.to(torch.int32))
        return (chosen_word.gather(1, word) > 0) & maskable

    def _select_spans(self, input_ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator,
                      rate: float) -> torch.Tensor:
        """SpanBERT spans: each maskable word starts a span with probability ``span_rate``.

        Spans are laid out over the row's maskable words only (a special is skipped, never counted
        in a span's length nor started on), and a span that runs off the end of the row continues
        at its first maskable word. On that ring every word is covered with the same probability,
        ``1 - prod_k (1 - span_rate * P(len > k))``, which ``span_rate`` is solved for, so the
        expected masked fraction is ``rate`` on every row — no loss at row ends or specials.
        """
        shape = input_ids.shape
        span_rate = span_start_rate(rate, self.config.span_p, self.config.max_span)
        starts = self._word_starts(input_ids) & maskable
        word = torch.cumsum(starts, dim=1) - 1  # index among the row's maskable words
        num_words = word[:, -1:] + 1
        word.clamp_(min=0)  # a special before the first word; masked out below
        begin = starts & (torch.rand(shape, generator=generator) < span_rate)
        u = torch.rand(shape, generator=generator)
        # Truncated geometric length in words by inverse CDF (span_p = 1: log_q = -inf, length 1).
        span_len = torch.floor_(torch.log1p(u.mul_(-self._span_cdf_max)).div_(self._span_log_q)).clamp_(max=self.config.max_span - 1)
        end = word + 1 + span_len.long()
        wrapped = begin & (end > num_words)
        # Coverage in word space via a difference array: +1 at the first word, -1 after the last;
        # a wrapped span ends at end - num_words and starts again at word 0.
        ones = begin.to(torch.int32)
        delta = torch.zeros(shape[0], shape[1] + self.config.max_span + 1, dtype=torch.int32)
        delta.scatter_add_(1, word, ones)
        delta.scatter_add_(1, torch.where(wrapped, end - num_words, end), -ones)
        delta[:, 0] += wrapped.sum(1, dtype=torch.int32)
        covered_word = torch.cumsum(delta, dim=1)[:, : shape[1]] > 0
        return covered_word.gather(1, word) & maskable
