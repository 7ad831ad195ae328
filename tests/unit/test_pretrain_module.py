"""MaskedLMModule knows of the masking and packing only what each batch carries: the attention mask is dropped
when nothing is padded, and the MFU figure counts the positions the batch's labels predict."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from roberta_pl.callbacks import ThroughputLogger, model_flops
from roberta_pl.model import IGNORE_INDEX, RobertaConfig, mlm_flops_per_token
from roberta_pl.pretraining.module import MaskedLMModule

MODEL = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=32,
             dropout=0.0, attention_dropout=0.0)
OPTIM = dict(lr=1e-3, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, warmup_steps=0, decay="linear")


def module(**kw) -> MaskedLMModule:
    return MaskedLMModule(model=MODEL, optim=OPTIM, max_steps=3, seq_len=32, micro_batch_size=4, **kw)


def rows(n: int, padded: bool) -> list[dict[str, torch.Tensor]]:
    """``n`` rows of 32 tokens with about 15% to predict; ``padded``: every other row ends in 10 pads."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (n, 32), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[::2, -10:] = 0
        ids[mask == 0] = 1
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.15) & (mask == 1), ids, IGNORE_INDEX)
    return [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]


def test_the_attention_mask_follows_the_batch():
    m = module()
    packed = next(iter(DataLoader(rows(4, padded=False), batch_size=4)))
    padded = next(iter(DataLoader(rows(4, padded=True), batch_size=4)))
    moved = m.transfer_batch_to_device(packed, torch.device("cpu"), 0)
    assert "attention_mask" not in moved and torch.equal(moved["labels"], packed["labels"])  # nothing padded
    assert torch.equal(m.transfer_batch_to_device(padded, torch.device("cpu"), 0)["attention_mask"],
                       padded["attention_mask"])
    # An all-ones mask changes nothing but the kernel SDPA may pick.
    with torch.no_grad():
        a = m.model(packed["input_ids"], packed["attention_mask"], packed["labels"]).loss
        b = m.model(moved["input_ids"], None, moved["labels"]).loss
    torch.testing.assert_close(a, b)


def test_checkpoints_that_recorded_the_mask_rate_and_packing_still_load():
    old = module(mask_prob=0.15, packed=True)  # hyper-parameters of a checkpoint from before: ignored
    assert "mask_prob" not in old.hparams and "packed" not in old.hparams
    assert dict(old.hparams) == dict(module().hparams)
    with pytest.raises(TypeError, match="mask_probability"):
        module(mask_probability=0.15)


def test_model_flops_count_the_head_on_predicted_positions_only():
    m = module()
    config = RobertaConfig(**MODEL)
    # At the rate the old fixed figure assumed, the count agrees with it.
    assert model_flops(m, 1000, 150) == pytest.approx(1000 * mlm_flops_per_token(config, 32, 0.15))
    assert model_flops(m, 1000, 300) - model_flops(m, 1000, 150) == pytest.approx(150 * m.flops_per_prediction)
    assert model_flops(torch.nn.Module(), 1000, 150) == 0  # a module without figures: no MFU


class _Peak(ThroughputLogger):
    """A ThroughputLogger with a peak on CPU (it has one only on CUDA), recording each window's batches."""

    PEAK = 1e12

    def __init__(self) -> None:
        super().__init__()
        self.window: list[dict] = []
        self.logged: list[tuple[float, float, int, int, int]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._peak = self.PEAK

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window.append(batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.logs_now(trainer):
            metrics = trainer.callback_metrics
            positions = sum(b["input_ids"].numel() for b in self.window)
            predicted = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in self.window)
            tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in self.window)
            self.logged.append((float(metrics["perf/mfu"]), float(metrics["perf/tokens_per_sec_per_device"]),
                                positions, predicted, tokens))
            self.window = []


def test_mfu_counts_the_positions_each_batch_predicts(tmp_path):
    # Tokens/s and MFU share the window's elapsed time, so their ratio is the FLOPs per real token over the peak:
    # exact, whatever the machine's speed. Padded rows: the FLOPs count every position, the tokens the real ones.
    logger = _Peak()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1,
                         logger=pl.loggers.CSVLogger(tmp_path), callbacks=[logger], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    m = module()
    trainer.fit(m, DataLoader(rows(24, padded=True), batch_size=4))
    assert len(logger.logged) == 3
    for mfu, tokens_per_sec, positions, predicted, tokens in logger.logged:
        assert tokens < positions and predicted > 0
        flops = positions * m.flops_per_position + predicted * m.flops_per_prediction
        assert mfu / tokens_per_sec == pytest.approx(flops / tokens / _Peak.PEAK, rel=1e-9)


def test_accuracy_is_the_share_of_masked_tokens_whose_label_scores_highest():
    # Computed by counting the logits at or above the target's (not an argmax, slower on CPU): without ties it must
    # agree with the argmax count.
    m = module()
    torch.manual_seed(1)
    for name, p in m.model.named_parameters():  # sharper logits than the init's, so some predictions are right
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.5)
    batch = next(iter(DataLoader(rows(8, padded=True), batch_size=8)))
    batch["labels"][0, :8] = batch["input_ids"][0, :8]  # unmasked positions (the 10%): the input is the answer
    with torch.no_grad():
        _, accuracy, _, count = m._shared_step(batch)
        out = m.model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected = (out.logits.argmax(-1) == out.targets).float().mean()
    assert count == int((batch["labels"] != IGNORE_INDEX).sum()) and 0 < float(expected) < 1, float(expected)
    assert float(accuracy) == pytest.approx(float(expected))


def test_a_tie_at_the_top_is_a_miss_and_so_is_a_nan():
    from roberta_pl.pretraining.module import masked_accuracy

    logits = torch.tensor([[0.0, 3.0, 1.0],    # target 1 scores highest: a hit
                           [2.0, 2.0, 1.0],    # target 0 ties with 1: a miss (an argmax would say hit)
                           [2.0, 2.0, 1.0],    # target 1 ties with 0: a miss
                           [float("nan"), 1.0, 0.0],  # a NaN target logit: a miss
                           [5.0, 1.0, 0.0]]).to(torch.bfloat16)
    assert float(masked_accuracy(logits, torch.tensor([1, 0, 1, 0, 0]))) == pytest.approx(2 / 5)


def test_adamw_uses_the_fused_kernel_on_cpu_with_the_per_tensor_update():
    from roberta_pl.optim import build_adamw

    def trained(fused: bool | None) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        torch.manual_seed(0)
        net = module().model
        opt = build_adamw(net, 1e-2, (0.9, 0.98), 1e-6, 0.01, fused=fused)
        for step in range(3):
            torch.manual_seed(100 + step)
            for p in net.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        return opt, [p.detach().clone() for p in net.parameters()]

    default, weights = trained(None)
    assert all(g["fused"] for g in default.param_groups)  # chosen for CPU parameters, not only CUDA ones
    loop, reference = trained(False)
    assert not any(g["fused"] for g in loop.param_groups)
    for a, b in zip(weights, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
