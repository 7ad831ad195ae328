"""The sparse MLM head's vocab projection and cross-entropy as one autograd function.

Both MLM heads (:class:`roberta_pl.model.RobertaForMaskedLM` and :class:`roberta_pl.modernbert.ModernBertForMaskedLM`)
project only the masked positions onto the vocabulary: ``logits = x @ W.T + b`` (``[N, V]``) and the loss is the
mean cross-entropy. As separate ops, autograd keeps the logits *and* their log-softmax, and backward makes two more
``[N, V]`` tensors (the gradient of the log-softmax, then of the logits): four ``[N, V]`` fp32 buffers a step, ~38 MB
each at vocab 32k with 300 masked positions. On CPU those sit above glibc's 32 MiB mmap threshold, so each comes
fresh from the kernel every step and is paid for in page faults (issue 27: ~27k faults, ~12% of a tiny model's step).

:func:`mlm_loss` keeps only the logits (they are returned, for masked accuracy). The log-sum-exp is taken in row
blocks and backward builds ``softmax - onehot`` a vocab block at a time (``[N, block]``, ~2 MiB, cache-resident),
using each block for its rows of the weight and bias gradients and its share of the input gradient at once. The
one-hot part is applied afterwards with ``index_add_``. The loss and every gradient equal ``F.cross_entropy`` on
``F.linear`` up to float summation order.

The fused path runs in fp32 without autocast (the CPU step); under autocast or in half precision the heads use the
plain ops, whose dtype handling autocast already gets right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_BYTES = 2 << 20  # the [N, block] slices of backward and the [rows, V] slices of the log-sum-exp (L2-sized)


def _blocks(total: int, per_item_bytes: int, block_bytes: int):
    step = max(1, block_bytes // max(1, per_item_bytes))
    return ((s, min(s + step, total)) for s in range(0, total, step))


class _LinearCrossEntropy(torch.autograd.Function):
    """``(mean cross-entropy, logits)`` of ``logits = x @ weight.T + bias`` against ``targets``."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets):
        logits = F.linear(x, weight, bias)
        n, v = logits.shape
        lse = torch.empty(n, dtype=logits.dtype, device=logits.device)
        for s, e in _blocks(n, v * logits.element_size(), BLOCK_BYTES):
            torch.logsumexp(logits[s:e], 1, out=lse[s:e])
        loss = (lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1)).mean()
        ctx.save_for_backward(x, weight, logits, lse, targets)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        x, weight, logits, lse, targets = ctx.saved_tensors
        n, v = logits.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty(v, dtype=logits.dtype, device=logits.device) if need_b and ctx.has_bias else None
        scale = (grad_loss / n if grad_loss is not None else torch.zeros((), dtype=logits.dtype,
                                                                         device=logits.device))
        shifted = lse.unsqueeze(1)
        for s, e in _blocks(v, n * logits.element_size(), BLOCK_BYTES):
            g = torch.sub(logits[:, s:e], shifted).exp_().mul_(scale)  # scale * softmax, this vocab block
            if grad_logits is not None:
                g.add_(grad_logits[:, s:e])
            if grad_x is not None:
                grad_x.addmm_(g, weight[s:e])
            if grad_w is not None:
                torch.mm(g.t(), x, out=grad_w[s:e])
            if grad_b is not None:
                torch.sum(g, 0, out=grad_b[s:e])
        # The one-hot part of softmax - onehot: each row's target column gets -scale.
        if grad_x is not None:
            grad_x.sub_(weight.index_select(0, targets) * scale)
        if grad_w is not None:
            grad_w.index_add_(0, targets, x * scale, alpha=-1)
        if grad_b is not None:
            grad_b.index_add_(0, targets, scale.expand(n), alpha=-1)
        return grad_x, grad_w, grad_b, None


def mlm_loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean cross-entropy, logits)`` of the vocab projection ``x @ weight.T + bias`` (``x`` ``[N, H]``, the
    predicted positions only) against ``targets`` ``[N]``; the loss in fp32, as ``F.cross_entropy(logits.float())``.
    """
    # CPU only: what it saves is glibc's page faults on fresh 38 MB buffers; on CUDA the block loop would cost launches.
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return _LinearCrossEntropy.apply(x, weight, bias, targets)
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(logits.float(), targets), logits
