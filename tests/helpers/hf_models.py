"""Small HuggingFace RoBERTa-family masked LMs built locally, with no download, as the hub's directories hold them:
``config.json`` and ``model.safetensors`` written by ``transformers`` itself, beside the tokenizer's own files.

The weights are random (``transformers``' init) and then nudged, so that no bias is zero and no LayerNorm is the
identity: a key that failed to load, or loaded into the wrong place, changes the logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

# model_type -> the masked-LM class transformers builds for it
MASKED_LM_CLASS = {"roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM",
                   "roberta-prelayernorm": "RobertaPreLayerNormForMaskedLM"}


def hf_masked_lm_dir(out: Path, tokenizer_dir: Path, model_type: str = "roberta", *, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 128, max_seq_len: int = 128,
                     seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """A ``transformers`` masked LM of ``model_type`` saved to ``out`` with ``tokenizer_dir``'s files beside it.

    Its vocabulary is the tokenizer's (``len(AutoTokenizer)``) and its special ids the tokenizer's; the rest of the
    config is roberta-base's (one token type, LayerNorm eps 1e-5, positions offset by the padding id).

    Args:
        out: the directory to write (created).
        tokenizer_dir: a HF tokenizer directory (its files are copied as they are).
        model_type: ``roberta``, ``xlm-roberta`` or ``roberta-prelayernorm``.
        seed: of the random weights.
        tie_word_embeddings: False stores a decoder of its own (another matrix than the embeddings).

    Returns:
        ``out``.
    """
    import transformers

    out = Path(out)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_seq_len + tok.pad_token_id + 1, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForMaskedLM.from_config(config)
    assert type(model).__name__ == MASKED_LM_CLASS[model_type], type(model).__name__
    return _save_nudged(model, out, tokenizer_dir)


class FirstBatchLoss(pl.Callback):
    """Saves, to ``path``, the first micro-batch a run trains on (its tensors) and the model's masked-token loss on
    it in eval mode, before any update: what the weights the run started from give."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step or batch_idx or self.path.exists():
            return
        model = pl_module.model
        model.eval()
        with torch.no_grad():
            loss = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss
        model.train()
        tensors = {k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        torch.save({"batch": tensors, "loss": float(loss)}, self.path)


EXPORT_SAMPLES = ["The <mask> statement is used to leave a loop early.", "  Indented:\tand tabbed, naïve café — ünïcode.",
                  "x = [1, 2, 3]  # a list"]


def check_exported_as_it_came_in(hf_dir: Path, model_dir: Path, model_type: str, checkpoint: Path,
                                 samples: list[str] = EXPORT_SAMPLES):
    """An export of a run continued from ``model_dir``: its model type and class, the tokenizer's own files byte for
    byte (tokenizer_config.json records the model's length) with the same ids, a clean load in ``transformers``, and
    logits equal to ``checkpoint``'s. Returns ``(tokenizer, hf model, encoded samples)`` for further checks."""
    import json

    import transformers

    from roberta_pl.checkpoints import load_pretrained

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [MASKED_LM_CLASS[model_type]]
    for f in model_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors", "tokenizer_config.json"):
            assert (hf_dir / f.name).read_bytes() == f.read_bytes(), f.name
    original, tok = (transformers.AutoTokenizer.from_pretrained(d) for d in (model_dir, hf_dir))
    assert type(tok) is type(original)
    for text in samples:
        assert tok(text)["input_ids"] == original(text)["input_ids"], text
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir, output_loading_info=True)
    assert type(hf).__name__ == MASKED_LM_CLASS[model_type]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours, _ = load_pretrained(checkpoint)
    enc = tok(samples, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(enc["input_ids"], enc["attention_mask"]).logits
        got = hf.eval()(**enc).logits
    real = enc["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() < 1e-4
    return tok, hf, enc


def hf_modernbert_dir(out: Path, tokenizer_dir: Path, *, hidden_size: int = 64, num_layers: int = 3,
                      num_heads: int = 2, intermediate_size: int = 96, max_seq_len: int = 64,
                      local_attention: int = 16, seed: int = 0) -> Path:
    """A ``transformers`` ``ModernBertForMaskedLM`` saved to ``out`` with ``tokenizer_dir``'s files beside it: its
    vocabulary and [CLS]/[SEP]/[PAD] ids the tokenizer's, its weights random and nudged (as :func:`hf_masked_lm_dir`)."""
    import transformers

    out = Path(out)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.ModernBertConfig(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_seq_len, local_attention=local_attention,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    torch.manual_seed(seed)
    model = transformers.ModernBertForMaskedLM(config)
    return _save_nudged(model, out, tokenizer_dir)


def _save_nudged(model, out: Path, tokenizer_dir: Path) -> Path:
    """Nudge every weight off its init (so a wrongly mapped key shows), save the model and copy the tokenizer beside it."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    return out
