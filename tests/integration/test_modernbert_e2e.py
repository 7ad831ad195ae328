"""ModernBERT end to end with the real Trainer: continued pretraining from a ModernBERT directory built here (its
byte-level BPE ``tokenizer.json`` with [CLS]/[SEP]/[MASK]), its export loading in ``transformers`` without
``trust_remote_code`` with the checkpoint's logits, a continued phase at a longer context and a larger RoPE base,
and pretraining ``model=modernbert_tiny`` from scratch."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hf_models import hf_modernbert_dir
from hf_tokenizers import local_texts, modernbert_tokenizer_dir
from hydra import compose, initialize_config_dir

from roberta_pl.checkpoints import export, load_pretrained
from roberta_pl.config import CONF_DIR
from roberta_pl.finetune.app import run as finetune
from roberta_pl.finetune.config import register_configs as register_finetune_configs
from roberta_pl.pretraining.app import run
from roberta_pl.pretraining.config import register_configs

register_configs()
register_finetune_configs()
SMALL = ["batch.seq_len=64", "batch.global_batch_size=8", "batch.micro_batch_size=4", "trainer=cpu",
         "trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.limit_val_batches=2",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2",
         "data.num_workers=0", "fill_mask=[]", "logger=csv"]
pytestmark = pytest.mark.slow


def compose_cfg(overrides, name: str = "pretrain"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _same_logits_in_transformers(hf_dir, ckpt, tok_dir):
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    enc = tok(["The [MASK] statement is used to leave a loop early.", "x = [1, 2, 3]"], padding=True,
              return_tensors="pt")
    ours, _ = load_pretrained(ckpt)
    with torch.no_grad():
        theirs, mine = hf(**enc).logits, ours(enc["input_ids"], enc["attention_mask"]).logits
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory):
    from data_pipelines.shards import write_shards

    base = tmp_path_factory.mktemp("modernbert")
    texts = local_texts(3000)
    tok_dir = modernbert_tokenizer_dir(base / "tokenizer", texts[:2000])
    model_dir = hf_modernbert_dir(base / "model", tok_dir)
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(texts[i:i + 20]) for i in range(0, len(texts), 20)) + "\n")
    write_shards(corpus, model_dir, base / "shards", num_shards=3, valid_fraction=0.1, num_workers=0, progress=False)
    return model_dir, base / "shards"


def test_continued_pretraining_exports_and_extends_its_context(tmp_path, modernbert_dir):
    model_dir, shards = modernbert_dir
    data = [f"data.train_shards={shards}", f"data.valid_shards={shards}"]
    run(compose_cfg([*SMALL, f"pretrained={model_dir}", *data]), tmp_path / "short", overrides=[])
    ckpt = tmp_path / "short" / "checkpoints" / "last.ckpt"
    hp = torch.load(ckpt, weights_only=True, mmap=True)["hyper_parameters"]
    assert hp["model"]["architecture"] == "modernbert" and hp["model"]["max_seq_len"] == 64
    exported = export(ckpt, tmp_path / "exported")
    assert (exported / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    _same_logits_in_transformers(exported, ckpt, model_dir)
    # The long-context phase: from the 64-token checkpoint to 256 tokens, the global RoPE base raised.
    longer = ["batch.seq_len=256", "model.max_seq_len=256", "model.global_rope_theta=320000", "trainer.max_steps=2"]
    run(compose_cfg([*SMALL, f"pretrained={ckpt}", *data, *longer]), tmp_path / "long", overrides=longer)
    long_ckpt = tmp_path / "long" / "checkpoints" / "last.ckpt"
    model = torch.load(long_ckpt, weights_only=True, mmap=True)["hyper_parameters"]["model"]
    assert (model["max_seq_len"], model["global_rope_theta"]) == (256, 320000.0)
    long_export = export(long_ckpt, tmp_path / "long_export")
    rope = transformers.AutoConfig.from_pretrained(long_export).rope_parameters
    assert rope["full_attention"]["rope_theta"] == 320000
    _same_logits_in_transformers(long_export, long_ckpt, model_dir)


@pytest.mark.parametrize("packing", ["full_sentences", "packed_docs"])
def test_pretraining_modernbert_tiny_from_scratch_exports_to_transformers(tmp_path, shard_dir, tokenizer_dir, packing):
    overrides = ["model=modernbert_tiny", f"data.tokenizer={tokenizer_dir}", f"data.train_shards={shard_dir}",
                 f"data.valid_shards={shard_dir}", f"data.packing={packing}"]
    run(compose_cfg([*SMALL, *overrides]), tmp_path / "run", overrides=overrides)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    exported = export(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(exported).eval()
    ours, _ = load_pretrained(ckpt)
    ids = torch.randint(5, ours.config.vocab_size, (2, 80))  # longer than the tiny preset's 32-token window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_finetuning_from_a_modernbert_directory_exports_a_transformers_classifier(tmp_path, modernbert_dir):
    import csv

    from data_pipelines.cli import main as data_cli

    model_dir, _ = modernbert_dir
    assert data_cli(["demo-task", str(tmp_path / "task")]) == 0
    overrides = [f"pretrained={model_dir}", f"task.train_file={tmp_path / 'task' / 'train.csv'}",
                 f"task.valid_file={tmp_path / 'task' / 'valid.csv'}", "task.label_column=source",
                 "trainer.max_epochs=1", "batch_size=16", "task.max_seq_len=64", "trainer.enable_progress_bar=false",
                 "logger=csv"]
    out = tmp_path / "run"
    finetune(compose_cfg(overrides, "finetune"), out)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    assert type(hf).__name__ == "ModernBertForSequenceClassification"
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    with (tmp_path / "task" / "valid.csv").open() as f:
        texts = [row["text"] for row in csv.DictReader(f)][:8]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert bool((enc["input_ids"][:, 0] == tok.cls_token_id).all())
    rows = [json.loads(line) for line in (out / "predictions" / "valid.jsonl").read_text().splitlines()][:8]
    with torch.no_grad():
        probs = hf(**enc).logits.softmax(-1)
    ours = torch.tensor([[r["probabilities"][hf.config.id2label[i]] for i in range(2)] for r in rows])
    torch.testing.assert_close(probs, ours, atol=1e-5, rtol=0)


def test_fill_mask_on_a_modernbert_directory_names_its_mask_token(modernbert_dir, capsys):
    from roberta_pl.cli.fill_mask import main as fill_mask_main

    model_dir, _ = modernbert_dir
    fill_mask_main([str(model_dir), "The function returns [MASK] list.", "--top-k", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "The function returns [MASK] list."
    assert out[1].startswith("  [MASK] #1: ") and out[1].count(", ") == 2
    with pytest.raises(SystemExit, match=r"error: no \[MASK\] token in 'no mask here'"):
        fill_mask_main([str(model_dir), "no mask here"])
