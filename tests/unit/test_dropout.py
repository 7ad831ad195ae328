"""roberta_pl/dropout.py and the CPU attention-dropout path of roberta_pl/attention.py: the mask keeps 1 - p of the
elements, scales them by 1 / (1 - p), backward applies the same mask, seeded draws repeat, eval and p = 0 are the
identity, and attention with dropout on CPU is softmax(q k^T / sqrt(d)) masked by the same draw, times v."""

import torch
import torch.nn.functional as F

from roberta_pl.attention import attend
from roberta_pl.dropout import Dropout, dropout


def test_cpu_training_mask_keeps_one_minus_p_scaled_and_backward_uses_it():
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.1)
    kept = y.detach() != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 400k draws: the standard error is 0.0005
    torch.testing.assert_close(y.detach()[kept], torch.full((int(kept.sum()),), 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * m)/dx = m, the same mask
    torch.manual_seed(0)
    torch.testing.assert_close(dropout(x.detach(), 0.1), y.detach())  # seeded runs repeat


def test_eval_and_zero_p_are_the_identity_and_the_module_keeps_nn_dropout_s_contract():
    x = torch.randn(8, 16)
    module = Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and module.state_dict() == {}
    assert torch.equal(module.eval()(x), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), F.dropout(x, 1.0))  # p = 1: torch's zeros, no division by zero


def test_cpu_attention_dropout_is_the_math_with_the_same_draw():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    torch.manual_seed(1)
    out = attend(q, k, v, dropout_p=0.2, layout=None)
    torch.manual_seed(1)
    keep = torch.rand(2, 3, 10, 10).ge(0.2) / 0.8
    probs = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
    torch.testing.assert_close(out, (probs * keep) @ v)
    torch.testing.assert_close(attend(q, k, v, dropout_p=0.0, layout=None), probs @ v)


def test_bf16_masks_keep_one_minus_p_not_a_multiple_of_1_256():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    y = dropout(x, 0.1)
    assert y.dtype == torch.bfloat16
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 1e-3, kept  # bf16 uniforms would keep 230/256 = 0.8984


def test_cpu_attention_under_bf16_autocast_is_sdpa_s():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, dtype=torch.bfloat16) for _ in range(3))
    torch.manual_seed(1)
    ours = attend(q, k, v, dropout_p=0.2)
    torch.manual_seed(1)
    sdpa = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.testing.assert_close(ours, sdpa, atol=0, rtol=0)
