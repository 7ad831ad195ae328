"""Continue pretraining an existing HuggingFace encoder (``roberta-pl-train pretrained=DIR``), end to end on real
models built here with no download: a ``RobertaForMaskedLM`` with a byte-level BPE tokenizer in roberta-base's
layout, and an ``XLMRobertaForMaskedLM`` with a SentencePiece tokenizer in XLM-R's. Each loads with its weights
(our step-0 loss is ``transformers``'), trains on shards written with its own tokenizer, resumes exactly, and goes
back out as it came in: its model type and tokenizer files, with the trained weights."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from hf_models import check_exported_as_it_came_in, hf_masked_lm_dir, hf_modernbert_dir
from hf_tokenizers import (
    byte_bpe_tokenizer_dir,
    local_texts,
    modernbert_tokenizer_dir,
    xlmr_tokenizer_dir,
)
from hydra import compose, initialize_config_dir

from roberta_pl.checkpoints import export, load_encoder, load_pretrained
from roberta_pl.config import CONF_DIR
from roberta_pl.pretraining.app import run
from roberta_pl.pretraining.config import register_configs

register_configs()
SMALL = ["batch.seq_len=64", "batch.global_batch_size=8", "batch.micro_batch_size=4", "trainer=cpu",
         "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.limit_val_batches=2",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2",
         "data.num_workers=0", "fill_mask=[]", "logger=csv"]
TOKENIZER_BUILDERS = {"roberta": byte_bpe_tokenizer_dir, "xlm-roberta": xlmr_tokenizer_dir}
SAMPLES = ["The <mask> statement is used to leave a loop early.", "  Indented:\tand tabbed, naïve café — ünïcode.",
           "x = [1, 2, 3]  # a list"]


@dataclass
class Family:
    model_type: str
    model_dir: Path  # the HF directory we continue from: config, weights, its own tokenizer files
    shards: Path  # shards written with that tokenizer
    straight: Path  # an uninterrupted continued run of 6 steps (made once; read by several tests)


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


def train(out_dir: Path, family: Family, *extra: str) -> dict:
    overrides = [*SMALL, f"pretrained={family.model_dir}", f"data.train_shards={family.shards}",
                 f"data.valid_shards={family.shards}", *extra]
    return run(compose_cfg(overrides), out_dir, overrides=list(extra))


def step_zero_callback(path: Path) -> str:
    return f"trainer.callbacks=[{{_target_:hf_models.FirstBatchLoss,path:'{path}'}}]"


@pytest.fixture(scope="module", params=sorted(TOKENIZER_BUILDERS))
def family(request, tmp_path_factory) -> Family:
    from data_pipelines.shards import write_shards

    model_type, base = request.param, tmp_path_factory.mktemp(request.param)
    texts = local_texts(3000)
    tok_dir = TOKENIZER_BUILDERS[model_type](base / "tokenizer", texts[:2000])
    model_dir = hf_masked_lm_dir(base / "model", tok_dir, model_type)
    corpus = base / "corpus.txt"  # documents of 20 lines, separated by blank lines
    corpus.write_text("\n\n".join("\n".join(texts[i:i + 20]) for i in range(0, len(texts), 20)) + "\n")
    write_shards(corpus, model_dir, base / "shards", num_shards=3, valid_fraction=0.1, num_workers=0, progress=False)
    fam = Family(model_type, model_dir, base / "shards", base / "straight")
    train(fam.straight, fam, step_zero_callback(base / "step0.pt"))
    return fam


def test_step_zero_loss_is_transformers_loss_on_the_same_batch(family):
    # The module's masked-token loss before its first update, on the first batch it trained on (eval mode), is the
    # loss transformers computes with the original directory: the encoder and the MLM head were loaded, not drawn.
    record = torch.load(family.straight.parent / "step0.pt", weights_only=True)
    batch = record["batch"]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(family.model_dir).eval()
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss
    assert (batch["labels"] != -100).sum() > 10
    assert abs(record["loss"] - float(expected)) < 1e-5, (record["loss"], float(expected))
    ckpt = torch.load(family.straight / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert ckpt["hyper_parameters"]["pretrained"] == str(family.model_dir)
    assert ckpt["hyper_parameters"]["model"]["hidden_size"] == 64  # the model's, not the tiny preset's 128


def test_a_continued_run_resumes_exactly(tmp_path, family, capsys):
    resumed = tmp_path / "resumed"
    train(resumed, family, "trainer.stop_at_step=3")
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert "Continuing pretraining from" in capsys.readouterr().out
    train(resumed, family)  # resume=auto: from its own checkpoint, not from the pretrained directory again
    out = capsys.readouterr().out
    assert "Resuming from" in out and "Continuing pretraining from" not in out, out
    a = torch.load(family.straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # bit for bit on CPU
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_export_goes_back_out_as_it_came_in(tmp_path, family):
    last = family.straight / "checkpoints" / "last.ckpt"
    for hf_dir in (family.straight / "hf", export(last, tmp_path / "exported")):
        tok, hf, enc = check_exported_as_it_came_in(hf_dir, family.model_dir, family.model_type, last, SAMPLES)
    # The trained weights, not the loaded ones; and fine-tuning starts from the same encoder either way.
    before = transformers.AutoModelForMaskedLM.from_pretrained(family.model_dir).state_dict()
    after = hf.state_dict()
    assert not torch.equal(before["lm_head.dense.weight"], after["lm_head.dense.weight"])
    from_export, _ = load_encoder(family.straight / "hf")
    from_ckpt, _ = load_encoder(family.straight / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(from_export(enc["input_ids"], enc["attention_mask"]),
                                   from_ckpt(enc["input_ids"], enc["attention_mask"]), rtol=0, atol=0)


def test_one_of_our_checkpoints_continues_with_the_tokenizer_it_records(tmp_path, family):
    # pretrained= a .ckpt of the continued run: its architecture and recorded tokenizer (the HF directory's), its
    # weights re-padded to a vocabulary multiple chosen for speed (a training key), the export still of the type
    # the model first came in as.
    ckpt = family.straight / "checkpoints" / "last.ckpt"
    cb = step_zero_callback(tmp_path / "step0.pt")
    overrides = [*SMALL, f"pretrained={ckpt}", f"data.train_shards={family.shards}", "trainer.max_steps=2",
                 "trainer.val_every_n_steps=2", "model.pad_vocab_multiple=64", cb]
    run(compose_cfg(overrides), tmp_path / "run", overrides=[cb])
    hp = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["hyper_parameters"]
    assert hp["tokenizer"] == str(family.model_dir) and hp["model"]["pad_vocab_multiple"] == 64
    record = torch.load(tmp_path / "step0.pt", weights_only=True)
    loaded, _ = load_pretrained(ckpt)
    batch = record["batch"]
    with torch.no_grad():
        expected = loaded(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss
    assert abs(record["loss"] - float(expected)) < 1e-5
    config = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    original = json.loads((family.model_dir / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"]) == (family.model_type, original["vocab_size"])


@pytest.mark.parametrize("key", ["model.hidden_size=32", "model.num_layers=4", "model.pre_layernorm=true",
                                 "model.vocab_size=2000"])
def test_a_key_that_would_change_the_architecture_is_refused_in_one_line(tmp_path, family, key):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", family, key)
    message = str(e.value)
    assert message.startswith("roberta-pl-train: error: ") and "\n" not in message, message
    assert key.split("=")[0] in message and f"pretrained={family.model_dir}" in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_the_command_line_is_read_too(tmp_path, family):
    # model.max_seq_len=128 is the tiny preset's own value, so only the command line tells that it was set.
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", *SMALL, f"pretrained={family.model_dir}",
           f"data.train_shards={family.shards}", f"run_dir={tmp_path / 'run'}", "model.max_seq_len=128"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("roberta-pl-train: error: model.max_seq_len=128: pretrained=") and \
        "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_model_directory_without_a_tokenizer_needs_data_tokenizer(tmp_path, family):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(family.model_dir / name, bare / name)
    overrides = [*SMALL, f"pretrained={bare}", f"data.train_shards={family.shards}", "trainer.max_steps=1"]
    with pytest.raises(SystemExit, match="has no tokenizer of its own .* pass data.tokenizer=DIR"):
        run(compose_cfg(overrides), tmp_path / "run")
    summary = run(compose_cfg([*overrides, f"data.tokenizer={family.model_dir}"]), tmp_path / "run")
    assert summary["global_step"] == 1


def test_training_keys_stay_settable_and_the_rest_is_the_models(family):
    from roberta_pl.pretraining import init

    cfg = compose_cfg([*SMALL, f"pretrained={family.model_dir}", "model.dropout=0.0", "model.pad_vocab_multiple=64"])
    source = init.read_source(cfg)
    settings = init.model_settings(cfg, source.config.vocab_size, source)
    assert settings["dropout"] == 0.0 and settings["pad_vocab_multiple"] == 64
    assert settings["attention_dropout"] == 0.1 and settings["hidden_size"] == 64  # the directory's config
    assert settings["hf_model_type"] == (None if family.model_type == "roberta" else family.model_type)


def test_another_tokenizer_is_refused_and_the_default_corpus_uses_the_models(tmp_path, family, tokenizer_dir,
                                                                             monkeypatch):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", family, f"data.tokenizer={tokenizer_dir}")
    assert "data.tokenizer=" in str(e.value) and "was trained with tokenizer" in str(e.value), str(e.value)
    # With no shards, the embedded corpus is sharded with the model's tokenizer, cached under its hash.
    import data_pipelines.corpus as corpus
    from data_pipelines.tokenizer import load_tokenizer
    from roberta_pl.pretraining import init
    from roberta_pl.pretraining.data import prepare_data

    small = tmp_path / "default_corpus-test.txt"
    small.write_text("\n\n".join("\n".join(local_texts(400)[i:i + 20]) for i in range(0, 400, 20)) + "\n")
    monkeypatch.setattr(corpus, "default_corpus", lambda *a, **k: small)
    monkeypatch.setattr(corpus, "default_corpus_path", lambda *a, **k: small)
    cfg = compose_cfg([*SMALL, f"pretrained={family.model_dir}", f"data.cache_dir={tmp_path / 'cache'}"])
    data = prepare_data(cfg, init.read_source(cfg))
    expected = load_tokenizer(family.model_dir).hash
    assert data.tokenizer.hash == expected and Path(data.tokenizer.path) == family.model_dir
    assert f"tok{expected}" in data.train_shards
    manifest = json.loads((Path(data.train_shards) / "manifest.json").read_text())
    assert manifest["tokenizer_hash"] == expected
    assert not (Path(data.train_shards).parent / "tokenizer").exists()  # none trained


@contextlib.contextmanager
def command_line(overrides):
    """Hydra's record of the run's command line, as ``@hydra.main`` leaves it (what ``command_line_overrides`` reads)."""
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        HydraConfig.instance().set_config(compose("pretrain", list(overrides), return_hydra_config=True))
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Untrained HF directories to read (no run): a RoBERTa, a ModernBERT, and a RoBERTa with an untied decoder."""
    base, texts = tmp_path_factory.mktemp("sources"), local_texts(400)
    bpe = byte_bpe_tokenizer_dir(base / "bpe", texts, vocab_size=400)
    return {"roberta": hf_masked_lm_dir(base / "roberta", bpe, hidden_size=32),
            "modernbert": hf_modernbert_dir(base / "modernbert", modernbert_tokenizer_dir(base / "mb", texts, 400),
                                            hidden_size=32),
            "untied": hf_masked_lm_dir(base / "untied", bpe, hidden_size=32, tie_word_embeddings=False)}


@pytest.mark.parametrize("source,group", [("roberta", "modernbert_tiny"), ("modernbert", "base"),
                                          ("modernbert", "tiny")])
def test_a_model_group_of_another_architecture_is_refused_in_one_line(sources, source, group):
    # The group's fields are its own preset's, so no model.* key looks chosen: the run continued PATH's model quietly.
    from roberta_pl.errors import ConfigError
    from roberta_pl.pretraining import init

    overrides = [*SMALL, f"pretrained={sources[source]}", f"model={group}"]
    with command_line(overrides), pytest.raises(ConfigError) as e:
        init.read_source(compose_cfg(overrides))
    message, other = str(e.value), "roberta" if source == "modernbert" else "modernbert"
    assert f"model={group} is a {other} model but pretrained={sources[source]} is a {source} one" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("source,group", [("roberta", "small"), ("modernbert", None), ("roberta", None)])
def test_a_model_group_of_the_same_architecture_or_none_leaves_the_source_s(sources, source, group):
    from roberta_pl.pretraining import init

    overrides = [*SMALL, f"pretrained={sources[source]}", *([f"model={group}"] if group else [])]
    with command_line(overrides):
        config = init.read_source(compose_cfg(overrides)).config
    assert (config.architecture, config.hidden_size) == (source, 32)


def test_an_untied_decoder_is_refused_in_one_line_before_training(sources):
    from roberta_pl.errors import ConfigError
    from roberta_pl.model import RobertaConfig
    from roberta_pl.models import masked_lm
    from roberta_pl.pretraining import init

    cfg = compose_cfg([*SMALL, f"pretrained={sources['untied']}"])
    source = init.read_source(cfg)
    model = masked_lm(RobertaConfig(**init.model_settings(cfg, source.config.vocab_size, source)))
    with pytest.raises(ConfigError, match=r"^pretrained=.*untied: lm_head\.decoder\.weight is not the token "
                                          r"embeddings .*tie_word_embeddings=false[^\n]*$"):
        init.initialise(model, source, resuming=False)
