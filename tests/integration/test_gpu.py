"""CUDA-only runs: DeepSpeed ZeRO-2/3 with bf16, consolidation of the ZeRO checkpoint, HF export.

Collected everywhere, skipped without a CUDA GPU (conftest.py); run them with `make test-gpu`.
"""

import json

import pytest
import torch
import transformers
from test_pretrain import TINY, compose_cfg, run

from roberta_pl.checkpoints import load_pretrained

pytestmark = pytest.mark.gpu

GPU = [o for o in TINY if not o.startswith("trainer=")]


@pytest.mark.parametrize("trainer", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_zero_bf16_trains_consolidates_and_exports(tmp_path, shard_dir, tokenizer_dir, trainer):
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    summary = run(compose_cfg([f"trainer={trainer}", "trainer.devices=1", *GPU, *data]), tmp_path)
    assert summary["global_step"] == 6
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a DeepSpeed checkpoint directory
    ours, _ = load_pretrained(last)  # consolidated to fp32
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[0, 10, 11, 4, 12, 2]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(p).all() for p in ours.parameters())


@pytest.mark.parametrize("trainer", ["deepspeed_zero2", "deepspeed_zero3"])
def test_roberta_base_seq512_bf16_zero(tmp_path, shard_dir, tokenizer_dir, trainer):
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    summary = run(compose_cfg([
        f"trainer={trainer}", "trainer.devices=1", "model=base", "batch.seq_len=512", "batch.micro_batch_size=8",
        "batch.global_batch_size=16", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
        "trainer.limit_val_batches=1", "checkpoint.every_n_steps=2", "trainer.enable_progress_bar=false",
        "data.num_workers=1", "fill_mask=[]", "logger=csv", *data]), tmp_path)
    assert summary["global_step"] == 4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 12 and config["hidden_size"] == 768
    transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")


def test_bf16_ddp_single_gpu_trains(tmp_path, shard_dir, tokenizer_dir):
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    summary = run(compose_cfg(["trainer=gpu", *GPU, *data]), tmp_path)
    assert summary["global_step"] == 6 and summary["metrics"]["val/loss"] < 20
