"""The domain-adaptation bench runs end to end from an HF model of roberta-base's layout and writes complete, sane
JSON (no figure is asserted): a tiny random RobertaForMaskedLM with a byte-level BPE tokenizer is continued on local
text beside the same shape from scratch (one LR each, no sweep, 6-second budgets; ~40 s on 2 cores)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hf_tokenizers import byte_bpe_tokenizer_dir, local_texts

REPO = Path(__file__).resolve().parents[2]


def general_model(out: Path) -> Path:
    """A 1-layer random RobertaForMaskedLM saved by transformers beside a roberta-base-layout tokenizer."""
    import transformers

    byte_bpe_tokenizer_dir(out, local_texts(2000), vocab_size=1000)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    config = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=128, max_position_embeddings=130, type_vocab_size=1,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, layer_norm_eps=1e-5)
    transformers.RobertaForMaskedLM(config).save_pretrained(out)
    return out


def domain_source(out: Path) -> Path:
    """Prose the tokenizer's text is not: Python's language reference, one file a topic (paragraphs, blank lines)."""
    import pydoc_data.topics

    out.mkdir()
    for i, key in enumerate(sorted(pydoc_data.topics.topics)):
        (out / f"{i:03d}-README.txt").write_text(pydoc_data.topics.topics[key])
    return out


@pytest.mark.slow
def test_domain_adaptation_bench_writes_complete_json(tmp_path):
    general = general_model(tmp_path / "general")
    out = tmp_path / "domain_adaptation.json"
    cmd = [sys.executable, str(REPO / "bench" / "domain_adaptation.py"), "--general", str(general),
           "--source", str(domain_source(tmp_path / "src")), "--work", str(tmp_path / "work"), "--minutes", "0.1",
           "--max-bytes", "200000", "--continued-lrs", "1e-3", "--scratch-lrs", "2e-3", "--heldout-blocks", "20",
           "--threads", "1", "--out", str(out)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "continued - general" in res.stdout  # the table was printed

    report = json.loads(out.read_text())
    assert report["code"] and report["date"] and report["machine"]["threads_each"] == 1
    recipes = report["settings"]["recipes"]
    assert f"pretrained={general}" in recipes["continued"] and "optim.decay=wsd" in recipes["continued"]
    assert f"data.tokenizer={general}" in recipes["scratch"] and not any(a.startswith("pretrained=") for a in recipes["scratch"])
    assert "model.hidden_size=64" in recipes["scratch"] and "model.num_layers=1" in recipes["scratch"]  # the same shape
    for name, lr in (("continued", 1e-3), ("scratch", 2e-3)):
        assert report["lr_sweeps"][name] == {"tried": [lr], "chosen": lr, "points": []}, name
    domain = report["domain"]
    assert domain["heldout_blocks"] == 20 and domain["shards"]["train"]["num_tokens"] > 0
    results = report["results"]
    assert set(results) == {"general", "continued", "scratch"} and "steps" not in results["general"]  # given, not trained
    for name, r in results.items():
        assert 0 <= r["heldout_accuracy"] <= 1 and math.isfinite(r["heldout_loss"]), name
        assert r["heldout_masked_tokens"] == domain["heldout_masked_tokens"], name  # the same blocks for all three
    for name in ("continued", "scratch"):
        r = results[name]
        assert r["steps"] > 0 and r["tokens"] >= r["steps"] * 16 * 128 and r["wall_seconds"] > 0, name
        assert math.isfinite(r["val_loss"]), name

    # Both results went back out with the general model's own tokenizer: the same ids for the same text.
    import transformers

    text = "Continued pretraining keeps the <mask> of the model it started from."
    ids = transformers.AutoTokenizer.from_pretrained(general)(text)["input_ids"]
    for name in ("continued", "scratch"):
        hf = tmp_path / "work" / "final-0.1min" / name / "hf"
        assert transformers.AutoTokenizer.from_pretrained(hf)(text)["input_ids"] == ids, name
