"""Dynamic MLM masking of a batch, vectorised, and a pure function of (seed, step, rank).

BERT/RoBERTa recipe (RoBERTa §4.1 "dynamic masking"): select ``mask_prob`` (0.15) of the
maskable tokens; of those, 80% become ``<mask>``, 10% a random non-special token, 10% stay. The
model predicts the original id at every selected position (``labels``), and ``-100`` elsewhere.

Selection units:

* token (default): each maskable token independently with probability ``mask_prob``;
* whole word (``whole_word=True``): a word is a SentencePiece piece starting with "▁" plus the
  continuation pieces after it; words are selected with probability ``mask_prob`` and all their
  pieces are masked together;
* span (``span=True``, SpanBERT): spans of whole words with geometric lengths
  (``p = span_p``, clipped to ``max_span``), started with a rate chosen so the expected masked
  fraction is ``mask_prob``.

Specials (``<s> <pad> </s> <unk> <mask>``) are never selected. Everything is a handful of tensor
ops over the batch, no Python loop over tokens; randomness comes only from the ``torch.Generator``
passed in, which :func:`mask_generator` seeds from (seed, step, rank), so a resumed run draws the
same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # ignored by torch.nn.functional.cross_entropy


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


class Masker:
    """Applies :class:`MaskingConfig` to batches of token ids.

    Args:
        vocab_size: number of ids.
        special_ids: ids never masked nor drawn as random replacements.
        mask_id: id of ``<mask>``.
        config: the masking recipe.
        word_start: boolean table over the vocabulary, True where a piece starts a word
            (see :meth:`data_pipelines.tokenizer.SpmTokenizer.word_start_table`); needed for
            whole-word and span masking.
    """

    def __init__(
        self,
        vocab_size: int,
        special_ids: tuple[int, ...],
        mask_id: int,
        config: MaskingConfig = MaskingConfig(),
        word_start: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.mask_id = mask_id
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[list(special_ids)] = True
        self.special = special
        # Random replacements come from ordinary tokens only, so "random" never injects <s> or <pad>.
        self.replacement_ids = torch.nonzero(~special).flatten()
        if config.whole_word or config.span:
            if word_start is None:
                raise ValueError("whole-word and span masking need the word_start table")
            self.word_start = torch.as_tensor(np.asarray(word_start, dtype=bool)) | special
        else:
            self.word_start = None
        if config.span:
            lengths = torch.arange(1, config.max_span + 1, dtype=torch.float64)
            probs = config.span_p * (1 - config.span_p) ** (lengths - 1)
            self.span_probs = (probs / probs.sum()).float()
            mean_len = float((lengths * probs).sum() / probs.sum())
            # Overlapping spans merge, so coverage is 1 - exp(-rate * mean_len) (Poisson); invert it.
            self.span_rate = -math.log(1 - config.mask_prob) / mean_len

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a batch.

        Args:
            input_ids: LongTensor ``[B, T]`` of original ids (padding included).
            generator: the only source of randomness.

        Returns:
            ``(masked_input_ids, labels)``: both ``[B, T]`` LongTensors; labels hold the original
            id where a token was selected and ``-100`` elsewhere.
        """
        cfg = self.config
        maskable = ~self.special[input_ids]
        if cfg.span:
            selected = self._select_spans(input_ids, maskable, generator)
        elif cfg.whole_word:
            selected = self._select_words(input_ids, maskable, generator)
        else:
            selected = (torch.rand(input_ids.shape, generator=generator) < cfg.mask_prob) & maskable
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        # One uniform draw per position decides <mask> / random / keep for the selected ones.
        action = torch.rand(input_ids.shape, generator=generator)
        to_mask = selected & (action < 1.0 - cfg.random_prob - cfg.keep_prob)
        to_random = selected & (action >= 1.0 - cfg.random_prob - cfg.keep_prob) & (action < 1.0 - cfg.keep_prob)
        masked = input_ids.masked_fill(to_mask, self.mask_id)
        picks = torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator)
        masked = torch.where(to_random, self.replacement_ids[picks], masked)
        return masked, labels

    def _word_index(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: whether it starts a word, and the index of its word within the row."""
        starts = self.word_start[input_ids]
        # A piece right after a special also starts a word: a block may begin mid-word.
        after_special = torch.zeros_like(starts)
        after_special[:, 1:] = self.special[input_ids[:, :-1]]
        starts = starts | after_special
        starts[:, 0] = True
        return starts, torch.cumsum(starts, dim=1) - 1

    def _select_words(self, input_ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        starts, word = self._word_index(input_ids)
        chosen_start = starts & maskable & (torch.rand(input_ids.shape, generator=generator) < self.config.mask_prob)
        # Spread each word's decision (made at its first piece) to all its pieces.
        chosen_word = torch.zeros(input_ids.shape, dtype=torch.int32)
        chosen_word.scatter_add_(1, word, chosen_start.to(torch.int32))
        return (chosen_word.gather(1, word) > 0) & maskable

    def _select_spans(self, input_ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, length = input_ids.shape
        starts, word = self._word_index(input_ids)
        span_start = starts & maskable & (torch.rand(input_ids.shape, generator=generator) < self.span_rate)
        span_len = torch.multinomial(self.span_probs, batch * length, replacement=True, generator=generator)
        span_len = (span_len + 1).view(batch, length)
        # Coverage in word space via a difference array: +1 at the first word, -1 after the last.
        delta = torch.zeros(batch, length + self.config.max_span + 1, dtype=torch.int32)
        ones = span_start.to(torch.int32)
        delta.scatter_add_(1, word, ones)
        delta.scatter_add_(1, word + span_len, -ones)
        covered_word = torch.cumsum(delta, dim=1)[:, :length] > 0
        return covered_word.gather(1, word) & maskable
