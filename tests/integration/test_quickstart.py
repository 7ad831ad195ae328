"""`make quickstart` in CI: the real command on the embedded default corpus, with fewer steps."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from data_pipelines.errors import SkipReport
from data_pipelines.manifest import resolve_shards
from data_pipelines.shard_format import iter_shard
from data_pipelines.tokenizer import load_tokenizer
from roberta_pl.checkpoints import load_pretrained


def unigram_cross_entropy(shard_dir, vocab_size: int) -> float:
    """Cross-entropy on the validation tokens of a model that knows only the training tokens' frequencies
    (add-one smoothed): the loss a masked LM reaches by learning the unigram distribution and nothing else."""
    def counts(split: str) -> np.ndarray:
        c = np.zeros(vocab_size)
        for shard in resolve_shards(shard_dir, split).shards:
            for doc in iter_shard(shard.url, expected_hash=None, vocab_size=None, on_error="raise", report=SkipReport()):
                c += np.bincount(doc, minlength=vocab_size)[:vocab_size]
        return c

    train, valid = counts("train") + 1, counts("valid")
    return float(-(valid / valid.sum() * np.log(train / train.sum())).sum())


@pytest.mark.slow
def test_quickstart_trains_exports_and_fills_masks(tmp_path, private_cache):
    run_dir = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", "experiment=quickstart", f"run_dir={run_dir}",
           "trainer.max_steps=150", "trainer.val_every_n_steps=75", "optim.warmup_steps=30",
           "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every stage ran: corpus/tokenizer/shards built (cache is private to this test session), training,
    # validation, loss curve, HF export, fill-mask.
    assert "validation masked-token accuracy" in proc.stdout
    assert proc.stdout.count("<mask> #1:") == 3
    history = json.loads((run_dir / "metrics_history.json").read_text())
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert sum(train_losses[-3:]) / 3 < sum(train_losses[:3]) / 3 - 1.0, train_losses  # the loss fell
    val = [h for h in history if "val_loss" in h]
    assert len(val) == 2
    # Measured against baselines from the same data, never a raw threshold: a model that has learned nothing
    # scores ln(V) (uniform), one that has learned the token frequencies scores the unigram cross-entropy.
    # After 150 steps it must have closed at least half of that gap (it is a function of the corpus, so it
    # cannot drift with whatever happens to be installed).
    shard_dir = next(private_cache.glob("default-dataset-*/shards"))
    vocab = load_tokenizer(shard_dir.parent / "tokenizer").vocab_size  # the model pads its table; padding is masked
    uniform, unigram = math.log(vocab), unigram_cross_entropy(shard_dir, vocab)
    closed = (uniform - val[-1]["val_loss"]) / (uniform - unigram)
    print(f"val loss {val[-1]['val_loss']:.3f}: uniform {uniform:.3f}, unigram {unigram:.3f}, gap closed {closed:.2f}")
    assert closed > 0.5, (val, uniform, unigram)
    assert (run_dir / "loss_curve.png").stat().st_size > 10_000
    # The HF export loads in transformers and gives our logits.
    ours, tok_dir = load_pretrained(run_dir / "checkpoints" / "last.ckpt")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(run_dir / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tok("Return the <mask> of the list.", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == 0 and ids[0, -1] == 2 and (ids == 4).sum() == 1
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    # A text far longer than the model (1,000+ tokens): the tokenizer files carry the model's real length,
    # so truncation and the pipelines cut it to what the position table holds instead of crashing.
    long_text = " ".join(["Return the <mask> of the list."] + ["The value is copied into a new buffer."] * 150)
    assert len(tok(long_text)["input_ids"]) > 1000
    assert tok.model_max_length == ours.config.max_seq_len
    enc = tok(long_text, truncation=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == ours.config.max_seq_len
    with torch.no_grad():
        transformers.AutoModel.from_pretrained(run_dir / "hf")(**enc)
    filled = transformers.pipeline("fill-mask", model=str(run_dir / "hf"), tokenizer_kwargs={"truncation": True})(long_text)
    assert len(filled) == 5 and all(0 <= f["score"] <= 1 for f in filled)
    # Readable by others on a shared cluster, as the umask allows (safetensors itself writes 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    assert (run_dir / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
