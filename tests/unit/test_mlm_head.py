"""The fused sparse MLM head (roberta_pl/mlm_head.py): the loss and every parameter's gradient of both architectures'
masked LMs equal the plain ``F.linear`` + ``F.cross_entropy`` head's, in fp32, with padded vocab columns and with
the returned logits used in the loss too; bf16 autocast takes the plain path."""

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.contract import IGNORE_INDEX
from roberta_pl.mlm_head import BLOCK_BYTES, mlm_loss
from roberta_pl.model import RobertaConfig
from roberta_pl.models import masked_lm

ARCHS = {
    # vocab 8001 padded to 8064: the -inf columns take part; 4 x 128 tokens at 30% give ~150 predicted rows, so
    # both the log-sum-exp's row blocks and backward's vocab blocks number several (BLOCK_BYTES = 2 MiB).
    "roberta": RobertaConfig.from_name("tiny", vocab_size=8001, pad_vocab_multiple=64),
    "modernbert": RobertaConfig.from_name("modernbert_tiny", vocab_size=8001, max_seq_len=128),
}


def _batch(config: RobertaConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (4, 128), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, IGNORE_INDEX)
    return ids, labels


def _plain_head(model, ids, labels):
    """The head as two plain ops: ``F.linear`` over the predicted positions, then ``F.cross_entropy``."""
    encoder, head = (model.roberta, model.lm_head) if hasattr(model, "roberta") else (model.model, model._logits)
    h = encoder(ids)
    where = labels.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
    logits = head(h.reshape(-1, h.shape[-1]).index_select(0, where))
    targets = labels.reshape(-1).index_select(0, where)
    return F.cross_entropy(logits.float(), targets), logits[:, :model.config.vocab_size]


def _loss_and_grads(model, forward, logits_weight: float):
    model.zero_grad(set_to_none=True)
    loss, logits = forward()
    (loss + logits_weight * logits.square().mean()).backward()
    return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("logits_weight", [0.0, 0.5], ids=["loss", "loss+logits"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_head_equals_plain_cross_entropy(arch, logits_weight):
    torch.manual_seed(0)
    config = ARCHS[arch]
    model = masked_lm(config).eval()  # no dropout: both passes see the same network
    ids, labels = _batch(config)
    n = int(labels.ne(IGNORE_INDEX).sum())
    assert n * config.padded_vocab_size * 4 > 2 * BLOCK_BYTES  # more than one block each way

    def fused():
        out = model(ids, labels=labels)
        return out.loss, out.logits

    loss, logits, grads = _loss_and_grads(model, fused, logits_weight)
    ref_loss, ref_logits, ref_grads = _loss_and_grads(model, lambda: _plain_head(model, ids, labels), logits_weight)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)  # the same GEMM
    assert grads.keys() == ref_grads.keys()
    largest = max(ref.abs().max() for ref in ref_grads.values())
    for name, ref in ref_grads.items():
        scale = ref.abs().max()
        if scale < 1e-6 * largest:  # zero but for rounding (RoBERTa's key bias: softmax ignores a per-query shift)
            assert "key.bias" in name and grads[name].abs().max() < 1e-6 * largest, name
            continue
        # 1e-6 of the gradient's own scale: the vocab blocks sum in another order than one GEMM
        torch.testing.assert_close(grads[name], ref, rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_autocast_and_half_precision_take_the_plain_path():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 40, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = mlm_loss(x, w, None, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets))
    loss, logits = mlm_loss(x.bfloat16(), w.bfloat16(), None, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
