"""Dropout for both encoder architectures: ``F.dropout``, except on CPU in training, where the mask is drawn cheaper.

Torch's CPU dropout draws its mask with ``bernoulli_`` (~5 ns an element with one thread), then divides the mask
and multiplies: at the tiny 4 × 256 shape of issue 27 dropout was ~100 ms of a ~630 ms training step. Here the mask
is ``rand >= p`` scaled by ``1 / (1 - p)`` in place (one uniform draw an element, ~2.5 ns): the same distribution
(keep probability ``1 - p`` to 2^-24), the same expected value, the same global generator (seeded runs stay
reproducible), but not the same mask as ``F.dropout`` for a given seed. CUDA keeps torch's fused kernel.

Imports torch and nothing else of the project (the model and roberta_pl.attention import it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``; on CPU in training with ``0 < p < 1``, the cheaper mask above. The uniforms
    are drawn in fp32 whatever ``x``'s dtype (bf16 uniforms are multiples of 1/256: p=0.1 would keep 230/256)."""
    if not training or not 0.0 < p < 1.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    keep = torch.rand(x.shape, dtype=torch.float32).ge_(p)
    return x * (keep.mul_(1.0 / (1.0 - p)) if x.dtype == torch.float32 else keep.to(x.dtype).mul_(1.0 / (1.0 - p)))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, no parameters, same state dict) through :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
