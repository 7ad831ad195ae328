"""Fine-tuning end to end: a model pretrained in this session, real task files, real Trainers, and the HF
exports checked in transformers."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from data_pipelines.cli import main as data_cli
from data_pipelines.demo_tasks import SOURCES, code_tags, docstrings, tagging_task
from data_pipelines.errors import DataError
from data_pipelines.hf_tokenizer import HFTokenizer as HFTokenizerJson  # the one HF tokenizer class
from data_pipelines.tabular import read_sequence_examples, read_token_examples
from data_pipelines.task_data import (
    align_word_labels,
    load_text_tokenizer,
    name_tag_ids,
)
from roberta_pl.cli.embed import main as embed_main
from roberta_pl.config import CONF_DIR
from roberta_pl.finetune.app import run
from roberta_pl.finetune.config import register_configs
from roberta_pl.finetune.module import EntityF1, entity_spans
from roberta_pl.model import (
    IGNORE_INDEX,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from roberta_pl.optim import layer_decay_groups
from roberta_pl.pretraining.app import run as pretrain
from roberta_pl.pretraining.config import register_configs as register_pretrain_configs

register_configs()
register_pretrain_configs()
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=256",
         "model.max_seq_len=64", "batch.seq_len=64", "batch.global_batch_size=32", "batch.micro_batch_size=32",
         "trainer=cpu", "trainer.max_steps=400", "trainer.val_every_n_steps=400", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=400", "data.num_workers=0", "fill_mask=[]",
         "logger=csv", "optim.lr=2e-3", "optim.warmup_steps=30"]
FAST = ["batch_size=16", "optim.lr=1e-3", "trainer.enable_progress_bar=false", "logger=csv", "task.max_seq_len=64"]


def compose_cfg(name: str, overrides) -> object:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def finetune(out_dir: Path, overrides) -> dict:
    return run(compose_cfg("finetune", [*FAST, *overrides]), out_dir)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shard_dir, tokenizer_dir) -> Path:
    """A small RoBERTa pretrained for 400 steps on the session's docstring corpus (~20 s)."""
    out = tmp_path_factory.mktemp("pretrained")
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    pretrain(compose_cfg("pretrain", [*SMALL, *data]), out)
    return out


@pytest.fixture(scope="module")
def source_task(tmp_path_factory) -> dict[str, Path]:
    """The two-source task, written by `roberta-pl-data demo-task` as a user would."""
    out = tmp_path_factory.mktemp("two_source")
    assert data_cli(["demo-task", str(out)]) == 0
    files = {"train": out / "train.csv", "valid": out / "valid.csv"}
    return files


def source_overrides(pretrained: Path, task: dict[str, Path], init: str = "pretrained") -> list[str]:
    return [f"pretrained={pretrained / 'checkpoints' / 'last.ckpt'}", f"init={init}",
            f"task.train_file={task['train']}", f"task.valid_file={task['valid']}", "task.label_column=source",
            "trainer.max_epochs=6", "early_stopping.patience=0"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_pretraining_beats_random_init_and_hf_export_gives_same_predictions(tmp_path, pretrained, source_task):
    runs = {init: finetune(tmp_path / init, source_overrides(pretrained, source_task, init))
            for init in ("pretrained", "random")}
    acc = {init: s["metrics"]["val/accuracy"] for init, s in runs.items()}
    print("two-source accuracy:", acc)
    # Same architecture, data, schedule and seed; only the encoder's starting weights differ.
    assert acc["pretrained"] >= acc["random"] + 0.15, acc
    assert acc["pretrained"] > 0.65

    out = tmp_path / "pretrained"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["concurrency", "web"] and summary["examples"] == {"train": 160, "valid": 120}
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["hyper_parameters"]["labels"] == ["concurrency", "web"]
    rows = read_jsonl(out / "predictions" / "valid.jsonl")
    with (source_task["valid"]).open() as f:
        gold = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == [g["text"] for g in gold] and [r["label"] for r in rows] == [g["source"] for g in gold]
    assert abs(np.mean([r["prediction"] == r["label"] for r in rows]) - acc["pretrained"]) < 1e-6

    # A user's view: transformers' Auto classes on the export, with its own tokenizer.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    assert [model.config.id2label[i] for i in probs.argmax(-1).tolist()] == [r["prediction"] for r in rows]
    ours = torch.tensor([[r["probabilities"][name] for name in ("concurrency", "web")] for r in rows])
    torch.testing.assert_close(probs, ours, atol=1e-5, rtol=0)
    assert model.config.problem_type == "single_label_classification"
    # A 1,000-token text through the text-classification pipeline: the export's tokenizer knows the model's
    # real length, so truncation cuts it to fit instead of indexing past the position table.
    long_text = " ".join([rows[0]["text"]] * 200)
    assert len(tok(long_text)["input_ids"]) > 1000
    out_long = transformers.pipeline("text-classification", model=str(out / "hf"))(long_text, truncation=True)
    assert out_long[0]["label"] in ("concurrency", "web")
    # roberta-pl-export converts masked LMs; given this run's classifier checkpoint it says where the export is.
    done = subprocess.run(["roberta-pl-export", str(out / "checkpoints" / "best.ckpt"), str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "is a fine-tuning checkpoint (sequence_classification" in done.stderr and f"{out / 'hf'}" in done.stderr


@pytest.mark.slow
def test_hf_directory_start_equals_checkpoint_start(tmp_path, pretrained, source_task):
    """The HF masked-LM export of the pretrained model is the same starting point as its checkpoint."""
    base = source_overrides(pretrained, source_task)
    base = [o for o in base if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=2"]
    from_ckpt = finetune(tmp_path / "ckpt", base)
    from_hf = finetune(tmp_path / "hf", [*base, f"pretrained={pretrained / 'hf'}"])
    assert from_hf["metrics"] == pytest.approx(from_ckpt["metrics"], abs=1e-6)


@pytest.mark.slow
def test_token_classification_end_to_end_and_hf_export(tmp_path, pretrained):
    files = tagging_task(tmp_path / "tagging")
    out = tmp_path / "run"
    summary = finetune(out, [f"pretrained={pretrained / 'hf'}", "task=token_classification",
                             f"task.train_file={files['train']}", f"task.valid_file={files['valid']}",
                             f"task.test_file={files['valid']}", "trainer.max_epochs=20", "optim.lr=1e-3",
                             "early_stopping.patience=0"])
    assert summary["labels"] == ["B-CODE", "I-CODE", "O"]
    m = summary["metrics"]
    assert {"val/f1", "val/precision", "val/recall", "val/accuracy"} <= set(m)
    # always-O scores 0: the tagger found code identifiers. (lr 1e-3: at 3e-3 this small model collapses to
    # always-O from some initialisations; 1e-3 gave F1 0.30-0.32 over seeds.)
    assert m["val/f1"] > 0.1, m

    rows = read_jsonl(out / "predictions" / "valid.jsonl")
    assert len(rows) == 60 and (out / "predictions" / "test.jsonl").exists()
    assert all(len(r["predictions"]) == len(r["tokens"]) == len(r["tags"]) for r in rows)
    # The metric recomputed from the predictions file, with the same span rules.
    # Words cut by truncation have no prediction (null) and are not scored.
    kept = [(r["tags"][: n], r["predictions"][: n]) for r in rows for n in [sum(p is not None for p in r["predictions"])]]
    assert any(len(t) < len(r["tags"]) for (t, _), r in zip(kept, rows))  # truncation happened in this data
    tp = sum(len(entity_spans(t) & entity_spans(p)) for t, p in kept)
    n_gold = sum(len(entity_spans(t)) for t, _ in kept)
    assert tp / n_gold == pytest.approx(m["val/recall"], abs=1e-6)

    # transformers' token classifier on the export predicts the same tag for every word.
    model = transformers.AutoModelForTokenClassification.from_pretrained(out / "hf").eval()
    tok = load_text_tokenizer(out / "hf")
    for r in rows[:30]:
        ids, _, positions, _ = align_word_labels(tok.encode_words(r["tokens"]), None, 64, tok.bos_id, tok.eos_id)
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0].argmax(-1)
        hf_tags = [model.config.id2label[int(pred[p])] for p in positions]
        assert hf_tags == r["predictions"][: len(positions)]


def test_label_alignment_on_words_split_into_several_pieces(tokenizer_dir, tmp_path):
    tok = load_text_tokenizer(tokenizer_dir)
    words = "The ThreadPoolExecutor.submit() schedules callables asynchronously".split()
    pieces = tok.encode_words(words)
    assert sum(len(p) > 1 for p in pieces) >= 2, pieces  # the point of the test: multi-piece words
    tags = [0, 1, 2, 0, 2]
    ids, labels, positions, cut = align_word_labels(pieces, tags, 64, tok.bos_id, tok.eos_id)
    assert not cut and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert [labels[p] for p in positions] == tags  # each word's first piece carries its tag
    assert sum(lab != IGNORE_INDEX for lab in labels) == len(words)  # and no other piece does
    for w, p, nxt in zip(words, positions, positions[1:] + [len(ids) - 1]):
        assert tok.tok.decode(ids[p:nxt]) == w  # the span from one first piece to the next is the word
    # The tokenizer.json path (HF directories without a SentencePiece model) aligns identically.
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    assert HFTokenizerJson(tmp_path).encode_words(words) == pieces
    # A byte-level BPE tokenizer.json (the original RoBERTa's kind) marks word starts with a space: each word
    # gets exactly the pieces it has in the running sentence, "Ġ" included.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(docstrings(SOURCES["web"]), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.enable_padding(pad_id=1, pad_token="<pad>", length=64)  # saved settings we must not inherit
    (tmp_path / "bpe").mkdir()
    bpe.save(str(tmp_path / "bpe" / "tokenizer.json"))
    byte_level = HFTokenizerJson(tmp_path / "bpe")
    word_pieces = byte_level.encode_words(words)
    assert sum(word_pieces, []) == byte_level.encode(" ".join(words))
    assert all(bpe.decode(p).strip() == w for p, w in zip(word_pieces, words))
    assert all(bpe.id_to_token(p[0]).startswith("Ġ") for p in word_pieces[1:])
    # Truncation drops whole words and says so.
    ids, labels, positions, cut = align_word_labels(pieces, tags, 8, tok.bos_id, tok.eos_id)
    assert cut and len(ids) <= 8 and len(positions) < len(words) and ids[-1] == tok.eos_id


def glue_files(root: Path) -> dict[str, Path]:
    """GLUE-layout files (the real column layouts; texts are docstrings, labels derived from them)."""
    texts = docstrings(SOURCES["web"])[:90]
    dirs = {name: root / name for name in ("SST-2", "CoLA", "STS-B", "MNLI")}
    for d in dirs.values():
        d.mkdir(parents=True)

    def tsv(path: Path, header: list[str] | None, rows: list[list]) -> None:
        lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
        path.write_text("\n".join(lines) + "\n")

    for split, part in (("train", texts[:60]), ("dev", texts[60:])):
        tsv(dirs["SST-2"] / f"{split}.tsv", ["sentence", "label"], [[t, int("http" in t.lower())] for t in part])
        tsv(dirs["CoLA"] / f"{split}.tsv", None, [["gj04", int(len(t) % 2), "", t] for t in part])
        tsv(dirs["STS-B"] / f"{split}.tsv",
            "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
            [[i, "main", "f", "2012", i, "s", "s", t, t[::-1], f"{len(t) % 50 / 10:.3f}"] for i, t in enumerate(part)])
        nli = ["contradiction", "neutral", "entailment"]
        header = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                  "sentence2_parse sentence1 sentence2 label1 gold_label").split()
        tsv(dirs["MNLI"] / ("train.tsv" if split == "train" else "dev_matched.tsv"), header,
            [[i, i, f"{i}e", "fiction", "(", "(", "(", "(", t, t.split()[0] + ' "quoted', nli[i % 3], nli[i % 3]]
             for i, t in enumerate(part)])
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("preset,data_dir,metric", [("sst2", "SST-2", "accuracy"), ("cola", "CoLA", "mcc"),
                                                     ("stsb", "STS-B", "pearson"), ("mnli", "MNLI", "accuracy")])
def test_glue_presets_read_their_files_and_export(tmp_path, pretrained, preset, data_dir, metric):
    dirs = glue_files(tmp_path / "glue")
    out = tmp_path / "run"
    summary = finetune(out, [f"pretrained={pretrained / 'hf'}", f"task={preset}", f"task.data_dir={dirs[data_dir]}",
                             "trainer.max_epochs=1"])
    assert f"val/{metric}" in summary["metrics"] and summary["examples"] == {"train": 60, "valid": 30}
    config = json.loads((out / "hf" / "config.json").read_text())
    if preset == "stsb":
        assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
        rows = read_jsonl(out / "predictions" / "valid.jsonl")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
        tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
        enc = tok([r["text"] for r in rows], [r["text_pair"] for r in rows], padding=True, truncation=True,
                  max_length=64, return_tensors="pt")
        with torch.no_grad():
            scores = model(**enc).logits[:, 0]
        torch.testing.assert_close(scores, torch.tensor([r["prediction"] for r in rows]), atol=1e-4, rtol=0)
    if preset == "mnli":
        assert config["id2label"] == {"0": "contradiction", "1": "neutral", "2": "entailment"}


@pytest.mark.parametrize("case,message", [
    ("missing_column", "train.jsonl, line 2: missing column 'text'"),
    ("empty_text", "train.jsonl, line 3: empty text in column 'text'"),
    ("unseen_label", "valid.jsonl, line 2: label 'maybe' never seen in training"),
    ("bad_json", "train.jsonl, line 5: not valid JSON"),
])
def test_bad_input_is_one_line_error_naming_file_and_line(tmp_path, tokenizer_dir, pretrained, case, message):
    good = [{"text": "a sentence about threads", "label": "yes"}, {"text": "another about mail", "label": "no"}]
    train = good + [{"text": "and a third", "label": "yes"}, {"text": "a fourth one", "label": "no"}]
    valid = list(good)
    if case == "missing_column":
        train[1] = {"body": "no text column", "label": "no"}
    elif case == "empty_text":
        train[2] = {"text": "   ", "label": "yes"}
    elif case == "unseen_label":
        valid[1] = {"text": "unsure", "label": "maybe"}
    train_file = write_jsonl(tmp_path / "train.jsonl", train)
    valid_file = write_jsonl(tmp_path / "valid.jsonl", valid)
    if case == "bad_json":
        train_file.write_text(train_file.read_text() + "{not json\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        finetune(out, [f"pretrained={pretrained / 'hf'}", f"task.train_file={train_file}", f"task.valid_file={valid_file}"])
    text = str(e.value)
    assert message in text and "\n" not in text and text.startswith("roberta-pl-finetune: error:")
    assert not (out / "checkpoints").exists()  # refused before any training


def test_long_texts_are_truncated_with_a_counted_warning(tmp_path, pretrained, caplog):
    words = " ".join(docstrings(SOURCES["web"])[:40]).split()
    train = [{"text": " ".join(words[i * 7:(i + 1) * 7]), "label": str(i % 2)} for i in range(16)]
    train[3]["text"] = train[9]["text"] = " ".join(words[:300])  # far beyond 64 tokens
    train_file = write_jsonl(tmp_path / "train.jsonl", train)
    test_file = write_jsonl(tmp_path / "test.jsonl", [{"text": "labelled", "label": "1"}, {"text": "not labelled"}])
    with caplog.at_level("WARNING", logger="roberta_pl.finetune"):
        # One step an epoch; validation every 2 steps counts across epochs.
        summary = finetune(tmp_path / "run", [f"pretrained={pretrained / 'hf'}", f"task.train_file={train_file}",
                                              f"task.valid_file={train_file}", f"task.test_file={test_file}",
                                              "trainer.max_epochs=5", "trainer.val_every_n_steps=2", "export_hf=false"])
    assert summary["truncated"] == {"train": 2, "valid": 2, "test": 0}
    assert summary["global_step"] == 5 and Path(summary["best_checkpoint"]).name == "best.ckpt"
    assert [r.get("label") for r in read_jsonl(tmp_path / "run" / "predictions" / "test.jsonl")] == ["1", None]
    assert any("2 of 16 texts were cut to fit max_seq_len=64 (first at line 4)" in r.getMessage() for r in caplog.records)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path, pretrained, source_task, capsys):
    overrides = [o for o in source_overrides(pretrained, source_task) if not o.startswith(("trainer.max_epochs", "early"))]
    # lr 1e-12: the weights (and so the metric) do not move; lr=0 is refused as a config error
    fast = [o for o in FAST if "progress_bar" not in o]
    summary = run(compose_cfg("finetune", [*fast, *overrides, "optim.lr=1e-12", "trainer.max_epochs=20",
                                           "early_stopping.patience=2", "export_hf=false", "task.metric=mcc",
                                           "trainer.enable_progress_bar=true"]), tmp_path / "run")
    assert summary["epochs"] == 3  # validation after epochs 1, 2, 3 never improves on the first: stop
    # The bar counts epochs from one out of max_epochs (Lightning's read "Epoch 2/19" here), shows the monitored
    # metric though the module keeps mcc off the bar, and no logger version (v_num).
    bar = capsys.readouterr().out
    assert "Epoch 3/20" in bar and "Epoch 0" not in bar and "val/mcc" in bar and "v_num" not in bar, bar[-2000:]


def test_rerun_refuses_to_overwrite_a_finished_finetuning(tmp_path, pretrained, source_task):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "best.ckpt").write_bytes(b"earlier result")
    with pytest.raises(SystemExit, match="already holds a fine-tuned model"):
        finetune(out, source_overrides(pretrained, source_task))
    assert (out / "checkpoints" / "best.ckpt").read_bytes() == b"earlier result"


def test_batch_size_that_does_not_split_is_a_one_line_error(tmp_path, pretrained, source_task):
    with pytest.raises(SystemExit, match=r"error: batch_size=8 does not split into micro-batches of 3 on 1 rank"):
        finetune(tmp_path / "run", [*source_overrides(pretrained, source_task), "batch_size=8", "micro_batch_size=3"])


def test_validation_interval_beyond_the_run_is_refused(tmp_path, pretrained, source_task):
    with pytest.raises(SystemExit, match=r"trainer.val_every_n_steps=500 is more than the 60 steps this run takes"):
        finetune(tmp_path / "run", [*source_overrides(pretrained, source_task), "trainer.val_every_n_steps=500"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_layer_wise_lr_decay_groups():
    config = RobertaConfig.from_name("tiny", vocab_size=300, num_layers=3)
    model = RobertaForSequenceClassification(config, 2)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5, num_layers=3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["classifier.out_proj.weight"])] == 1.0
    assert lr_of[id(params["roberta.encoder.layer.2.output.dense.weight"])] == 0.5
    assert lr_of[id(params["roberta.encoder.layer.0.output.dense.weight"])] == 0.125
    assert lr_of[id(params["roberta.embeddings.word_embeddings.weight"])] == 0.0625
    assert wd_of[id(params["roberta.encoder.layer.0.output.LayerNorm.weight"])] == 0.0
    assert wd_of[id(params["roberta.encoder.layer.0.output.dense.weight"])] == 0.1
    assert len(lr_of) == len(params)  # every parameter in exactly one group


def test_entity_f1_follows_conlleval_chunk_rules():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)}
    assert entity_spans(["I-PER", "I-PER", "O"]) == {("PER", 0, 2)}  # IOB1-style start
    labels = ["B-PER", "I-PER", "O"]
    metric = EntityF1(labels)
    gold = torch.tensor([[IGNORE_INDEX, 0, 1, 2, 0, IGNORE_INDEX]])
    pred = torch.tensor([[2, 0, 1, 2, 2, 2]])  # first entity right, second missed; -100 positions ignored
    metric.update(pred, gold)
    out = metric.compute()
    assert out["precision"] == 1.0 and out["recall"] == 0.5 and out["f1"] == pytest.approx(2 / 3)


def test_readers_handle_glue_tsv_quotes_headerless_files_and_conll(tmp_path):
    tsv = tmp_path / "dev.tsv"
    tsv.write_text('sentence\tlabel\nit \'s a "charming and often affecting journey\t1\n\nsecond\t0\n')
    ex = read_sequence_examples(tsv, "sentence", "label")
    assert [(e.line, e.text, e.label) for e in ex] == [(2, 'it \'s a "charming and often affecting journey', "1"),
                                                       (4, "second", "0")]
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tOur friends won't buy this analysis.\n")
    assert read_sequence_examples(cola, "sentence", "label", header=False,
                                  columns=["source", "label", "original", "sentence"])[0].label == "1"
    conll = tmp_path / "x.conll"
    conll.write_text("-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n")
    ex = read_token_examples(conll)
    assert [(e.line, e.text, e.label) for e in ex] == [(3, ["EU", "rejects"], ["B-ORG", "O"]), (6, ["Peter"], ["B-PER"])]
    bom = tmp_path / "excel.csv"  # spreadsheet exports begin with a byte-order mark
    bom.write_bytes("text,label\r\nfine,1\r\n".encode("utf-8-sig"))
    assert [(e.text, e.label) for e in read_sequence_examples(bom, "text", "label")] == [("fine", "1")]
    nulls = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": None}, {"text": "b", "label": 1}])
    assert [e.label for e in read_sequence_examples(nulls, "text", "label", require_labels=False)] == [None, "1"]
    with pytest.raises(DataError, match=r"test.jsonl, line 1: empty label in column 'label'"):
        read_sequence_examples(nulls, "text", "label")  # null is a missing label, not a class named "None"
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"tokens": ["EU", "rejects"], "ner_tags": [3, 0]}])
    examples = {"train": read_token_examples(ids, "tokens", "ner_tags")}
    assert examples["train"][0].label == ["3", "0"]  # datasets-style tag ids ...
    with pytest.raises(DataError, match=r"ids.jsonl: the tags are integer ids; name them in order with task.labels"):
        name_tag_ids(examples, [], {"train": ids})
    name_tag_ids(examples, ["O", "B-PER", "I-PER", "B-ORG"], {"train": ids})
    assert examples["train"][0].label == ["B-ORG", "O"]  # ... named by task.labels
    test_csv = tmp_path / "test.csv"  # a test file: an empty label cell is an unlabelled row
    test_csv.write_text("text,label\nfirst,1\nsecond,\n")
    assert [e.label for e in read_sequence_examples(test_csv, "text", "label", require_labels=False)] == ["1", None]
    untagged = tmp_path / "test.conll"
    untagged.write_text("EU B-ORG\nrejects O\n\nPeter\nsays\n")
    assert [e.label for e in read_token_examples(untagged, require_labels=False)] == [["B-ORG", "O"], None]
    with pytest.raises(DataError, match=r"words.jsonl, line 1: empty word in column 'tokens'"):
        read_token_examples(write_jsonl(tmp_path / "words.jsonl", [{"tokens": ["a", ""], "tags": ["O", "O"]}]))
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: 2 words but 1 tags"):
        read_token_examples(bad)
    assert code_tags(["use", "os.path", "join()", "here"]) == ["O", "B-CODE", "I-CODE", "O"]


@pytest.mark.slow
def test_embed_cli_writes_pooled_embeddings_matching_transformers(tmp_path, pretrained):
    texts = docstrings(SOURCES["concurrency"])[:20]
    src = tmp_path / "texts.csv"
    with src.open("w", newline="") as f:
        csv.writer(f).writerows([["id", "body"], *[[i, t] for i, t in enumerate(texts)]])
    hf_dir = pretrained / "hf"
    embed_main([str(hf_dir), str(src), "--column", "body"])
    vectors = np.load(tmp_path / "texts.npy")
    assert vectors.shape == (20, 64) and vectors.dtype == np.float32
    # transformers' encoder over the same tokens, mean-pooled, is the same vector.
    model = transformers.AutoModel.from_pretrained(hf_dir, add_pooling_layer=False).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    np.testing.assert_allclose(vectors, ((hidden * mask).sum(1) / mask.sum(1)).numpy(), atol=1e-4)
    embed_main([str(hf_dir), str(src), "--column", "body", "--pooling", "cls", "-o", str(tmp_path / "cls.npy")])
    np.testing.assert_allclose(np.load(tmp_path / "cls.npy"), hidden[:, 0].numpy(), atol=1e-4)
    # Refuses to overwrite; a missing column names the file and line (the console script, as users run it).
    with pytest.raises(SystemExit, match="texts.npy exists; pass --overwrite"):
        embed_main([str(hf_dir), str(src), "--column", "body"])
    bad = subprocess.run(["roberta-pl-embed", str(hf_dir), str(src), "-o", str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and not (tmp_path / "x.npy").exists()
    assert bad.stderr.strip().endswith("texts.csv, line 2: missing column 'text' (columns: id, body)")


@pytest.mark.slow
def test_finetune_cli_help_and_error(tmp_path):
    done = subprocess.run(["roberta-pl-finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for preset in (CONF_DIR / "task").glob("*.yaml"):  # the help names every task the config tree holds
        assert preset.stem in done.stdout, preset.stem
    done = subprocess.run(["roberta-pl-finetune", f"run_dir={tmp_path}/r"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("roberta-pl-finetune: error: pretrained=PATH is required")


@pytest.mark.slow
def test_ddp_finetuning_with_two_gloo_processes(tmp_path, pretrained, source_task):
    """`trainer=ddp` on 2 CPU processes: both ranks train, rank 0 writes every prediction once."""
    out = tmp_path / "ddp"
    task = tmp_path / "task"  # 121 validation rows: 2 ranks' padded sampler counts one twice, the summary must not
    assert data_cli(["demo-task", str(task), "--valid", "121"]) == 0
    source_task = {"train": task / "train.csv", "valid": task / "valid.csv"}
    args = [*FAST, *source_overrides(pretrained, source_task), "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "trainer.max_epochs=2", f"run_dir={out}"]
    done = subprocess.run(["roberta-pl-finetune", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done: custom" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    # 160 examples, global batch 16 = 2 ranks x micro 8: 10 optimizer steps an epoch.
    assert summary["global_step"] == 20
    rows = read_jsonl(out / "predictions" / "valid.jsonl")
    assert sorted(r["line"] for r in rows) == list(range(2, 123))
    # The summary's metric is rank 0's exact score of the best checkpoint: the predictions file's accuracy.
    assert summary["metrics"]["val/accuracy"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in rows]))
    assert transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf").num_labels == 2


@pytest.mark.parametrize("precision", ["bf16-true", "16-mixed"])
def test_reduced_precision_finetuning_exports_fp32(tmp_path, pretrained, source_task, precision):
    """bf16 weights (bf16-true) and fp16 with a real GradScaler on CPU (16-mixed) train, and the HF export
    is float32 as its config.json says."""
    from safetensors import safe_open

    out = tmp_path / "run"
    summary = finetune(out, [*source_overrides(pretrained, source_task), f"trainer.precision={precision}",
                             "trainer.max_epochs=1"])
    assert 0.0 <= summary["metrics"]["val/accuracy"] <= 1.0
    with safe_open(str(out / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert json.loads((out / "hf" / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.slow
def test_multirun_sweep_with_wandb_offline(tmp_path, pretrained, source_task):
    """`roberta-pl-finetune -m optim.lr=a,b logger=wandb`: one run dir per job, each with its W&B offline run
    holding the validation metrics and the resolved config."""
    from wandb_records import history_and_config

    args = ["-m", *FAST, *source_overrides(pretrained, source_task), "optim.lr=1e-4,3e-4", "trainer.max_epochs=2",
            "logger=wandb", f"run_dir={tmp_path}/lr"]
    done = subprocess.run(["roberta-pl-finetune", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for job, lr in (("0", 1e-4), ("1", 3e-4)):
        run_dir = tmp_path / "lr-sweep" / job
        assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 20
        run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
        (wandb_run,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
        rows, config = history_and_config(wandb_run / f"run-{run_id}.wandb")
        assert {"train/loss", "val/accuracy", "val/f1", "val/mcc", "val/loss"} <= set().union(*rows)
        assert config["optim"]["lr"] == lr and config["task"]["label_column"] == "source"


def test_embed_reads_one_row_per_line_and_names_bad_lines(tmp_path):
    from data_pipelines.errors import DataError
    from roberta_pl.cli.embed import read_texts

    good = tmp_path / "good.txt"
    good.write_text("first sentence\nsecond one\n\n\n")  # blank lines at the end are ignored
    assert [(e.line, e.text) for e in read_texts(good, "text")] == [(1, "first sentence"), (2, "second one")]
    gap = tmp_path / "gap.txt"
    gap.write_text("first\n\nthird\n")
    with pytest.raises(DataError, match=r"gap.txt:2: blank line"):
        read_texts(gap, "text")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt:2: not UTF-8"):
        read_texts(latin, "text")


@pytest.mark.slow
def test_pre_layernorm_pretraining_exports_and_finetunes(tmp_path, shard_dir, tokenizer_dir, source_task):
    """model.pre_layernorm=true end to end: pretraining exports a roberta-prelayernorm masked LM, fine-tuning
    starts from its checkpoint, and the classifier export loads in transformers' RobertaPreLayerNorm class with
    the same probabilities. (The HF export as a start is the same encoder: test_hf_parity loads it exactly.)"""
    pre = tmp_path / "pretrain"
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    short = ["trainer.max_steps=10", "trainer.val_every_n_steps=10", "checkpoint.every_n_steps=10"]
    pretrain(compose_cfg("pretrain", [*SMALL, *data, *short, "model.pre_layernorm=true"]), pre)
    hf_mlm = json.loads((pre / "hf" / "config.json").read_text())
    assert hf_mlm["model_type"] == "roberta-prelayernorm"
    assert hf_mlm["architectures"] == ["RobertaPreLayerNormForMaskedLM"]
    # roberta-pl-export's path from the checkpoint writes the same weights as the run's own export.
    from safetensors.torch import load_file

    from roberta_pl.checkpoints import export

    exported = export(pre / "checkpoints" / "last.ckpt", tmp_path / "exported")
    ours, run_export = load_file(exported / "model.safetensors"), load_file(pre / "hf" / "model.safetensors")
    assert ours.keys() == run_export.keys() and all(torch.equal(ours[k], run_export[k]) for k in ours)
    assert json.loads((exported / "config.json").read_text()) == hf_mlm

    out = tmp_path / "finetune"
    overrides = [o for o in source_overrides(pre, source_task) if not o.startswith("trainer.max_epochs")]
    summary = finetune(out, [*overrides, "trainer.max_epochs=1"])
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf", output_loading_info=True)
    assert type(model).__name__ == "RobertaPreLayerNormForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rows = read_jsonl(out / "predictions" / "valid.jsonl")
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        probs = model.eval()(**enc).logits.softmax(-1)
    ours = torch.tensor([[r["probabilities"][name] for name in summary["labels"]] for r in rows])
    torch.testing.assert_close(probs, ours, atol=1e-5, rtol=0)


def readme_demo_overrides(pretrained: Path, task: dict[str, Path], init: str) -> list[str]:
    """The README's demo command: nothing but the model, the task files and init (the bar off for the log)."""
    return [f"pretrained={pretrained / 'checkpoints' / 'last.ckpt'}", "task=sequence_classification",
            f"task.train_file={task['train']}", f"task.valid_file={task['valid']}", "task.label_column=source",
            f"init={init}", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_readme_demo_with_size_defaults_learns_and_init_random_gets_its_own_run_dir(tmp_path, pretrained, source_task):
    """The README's demo as written, with every fine-tuning default: for this small encoder (hidden 64) the
    size defaults choose lr 1e-3 and patience 10 (base's 2e-5 left the probabilities at 0.51/0.49 and the
    accuracy at the majority class's), and it learns, measured against the majority class of the validation file. The same command with init=random
    then runs in its own directory instead of being refused as a rerun of the first."""
    summaries, dirs = {}, {}
    for init in ("pretrained", "random"):
        cfg = compose_cfg("finetune", readme_demo_overrides(pretrained, source_task, init))
        dirs[init] = tmp_path / cfg.run_dir  # runs/finetune-custom-<init>, under the user's working directory
        summaries[init] = run(cfg, dirs[init])
        hparams = torch.load(dirs[init] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
        assert hparams["optim"]["lr"] == 1e-3
    assert dirs["pretrained"] != dirs["random"] and summaries["random"]["init"] == "random"
    with source_task["valid"].open() as f:
        gold = [row["source"] for row in csv.DictReader(f)]
    majority = max(gold.count(label) for label in set(gold)) / len(gold)
    acc = summaries["pretrained"]["metrics"]["val/accuracy"]
    print(f"defaults: accuracy {acc:.3f} (random init {summaries['random']['metrics']['val/accuracy']:.3f}), "
          f"majority class {majority:.3f}")
    assert acc >= majority + 0.15, (acc, majority)  # measured: 0.867 against 0.542


def test_explicit_lr_and_patience_win_over_the_size_defaults():
    from roberta_pl.errors import ConfigError
    from roberta_pl.finetune.config import fill_size_defaults, size_defaults

    assert (size_defaults(128).preset, size_defaults(768).lr, size_defaults(1024).preset) == ("tiny", 2e-5, "large")
    cfg = compose_cfg("finetune", ["optim.lr=3e-5"])
    assert fill_size_defaults(cfg, 128) == ("early_stopping.patience=10: the defaults for a tiny-size encoder "
                                            "(hidden size 128); set them to override")
    assert (cfg.optim.lr, cfg.early_stopping.patience) == (3e-5, 10)
    cfg = compose_cfg("finetune", ["optim.lr=3e-5", "early_stopping.patience=0"])
    assert fill_size_defaults(cfg, 128) is None and (cfg.optim.lr, cfg.early_stopping.patience) == (3e-5, 0)
    cfg = compose_cfg("finetune", [])
    fill_size_defaults(cfg, 768)
    assert (cfg.optim.lr, cfg.early_stopping.patience) == (2e-5, 3)
    with pytest.raises(ConfigError, match=r"optim.lr=-0.001: the peak learning rate must be positive"):
        fill_size_defaults(compose_cfg("finetune", ["optim.lr=-1e-3"]), 128)


@pytest.mark.slow
def test_tagging_demo_with_size_defaults_trains_through_its_ten_epochs(tmp_path, pretrained):
    """The tagging demo with the defaults: patience 3 ended it after 4 epochs at F1 0.056, because a small
    tagger predicts all-O (F1 0, the baseline) for its first epochs, so F1 stalls while the model still learns.
    The size defaults train it through its 10 epochs, and the epochs past the 4th still lower the validation
    loss. (This session's 400-step, hidden-64 model is still all-O after 10 epochs on some data orders and not
    on others, so its F1 is not asserted; the quickstart model reaches 0.53 with the same defaults, README.)"""
    files = tagging_task(tmp_path / "tagging")
    summary = run(compose_cfg("finetune", [f"pretrained={pretrained / 'hf'}", "task=token_classification",
                                           f"task.train_file={files['train']}", f"task.valid_file={files['valid']}",
                                           "trainer.enable_progress_bar=false"]), tmp_path / "run")
    print("tagging with defaults:", summary["metrics"], summary["epochs"])
    assert summary["epochs"] == 10  # not stopped early on the all-O plateau
    with next((tmp_path / "run" / "csv").glob("*/metrics.csv")).open() as f:
        val_loss = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(val_loss) == 10 and val_loss[-1] < val_loss[3] - 0.01, val_loss  # learning where patience 3 stopped


def test_finetuning_uses_its_own_dropout_not_the_pretraining_recipes(tmp_path, shard_dir, tokenizer_dir, source_task,
                                                                     capsys):
    """Fine-tuning's dropout is its own default by model size, never the pretrained model's: a checkpoint pretrained
    with dropout 0.3 fine-tunes with the tiny default (0), says so, and `dropout=` / `attention_dropout=` override it."""
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    steps = ["trainer.max_steps=10", "trainer.val_every_n_steps=10", "checkpoint.every_n_steps=10", "optim.warmup_steps=2"]
    pretrain(compose_cfg("pretrain", [*SMALL, *data, *steps, "model.dropout=0.3", "model.attention_dropout=0.3"]),
             tmp_path / "pre")
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    recorded = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["model"]
    assert recorded["dropout"] == recorded["attention_dropout"] == 0.3
    base = [f"pretrained={ckpt}", f"task.train_file={source_task['train']}", f"task.valid_file={source_task['valid']}",
            "task.label_column=source", "trainer.max_epochs=1", "export_hf=false"]
    for i, (extra, hidden, attention, origin) in enumerate((
            ([], 0.0, 0.0, "the tiny-size default"),
            (["dropout=0.2", "attention_dropout=0.05"], 0.2, 0.05, "as set"),
            (["dropout=0.2"], 0.2, 0.2, "as set"))):
        out = tmp_path / f"run{i}"
        finetune(out, [*base, *extra])
        assert (f"regularisation: dropout {hidden:g}, attention_dropout {attention:g} ({origin}; the pretrained model "
                f"had 0.3 / 0.3), optim.weight_decay 0.1; set dropout=") in capsys.readouterr().out
        model = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]["model"]
        assert (model["dropout"], model["attention_dropout"]) == (hidden, attention), extra
    with pytest.raises(SystemExit, match="dropout=1.5: a dropout probability is in"):
        finetune(tmp_path / "bad", [*base, "dropout=1.5"])
    # From small size up the default is RoBERTa's 0.1, whatever a dropout-0 pretraining recipe used.
    from roberta_pl.finetune.config import regularisation

    cfg = compose_cfg("finetune", [])
    fields, line = regularisation(cfg, {"hidden_size": 512, "dropout": 0.0, "attention_dropout": 0.0})
    assert (fields["dropout"], fields["attention_dropout"]) == (0.1, 0.1) and "(the small-size default; the pretrained model had 0 / 0)" in line


@pytest.mark.parametrize("overrides,expected", [
    (["attention_dropout=0.3"], "dropout 0 (the tiny-size default), attention_dropout 0.3 (as set; "),
    (["dropout=0.2"], "dropout 0.2, attention_dropout 0.2 (as set; "),
    ([], "dropout 0, attention_dropout 0 (the tiny-size default; "),
])
def test_regularisation_line_says_where_each_dropout_comes_from(overrides, expected):
    from roberta_pl.finetune.config import regularisation

    fields, line = regularisation(compose_cfg("finetune", overrides), {"hidden_size": 64, "dropout": 0.1,
                                                                      "attention_dropout": 0.1})
    assert line.startswith(f"regularisation: {expected}the pretrained model had 0.1 / 0.1)"), line


def test_a_model_with_fewer_embedding_rows_than_its_tokenizer_is_refused(tmp_path, tokenizer_dir, source_task):
    """An HF directory whose vocab_size is below the tokenizer's: one line naming both sizes and the directory, not
    an IndexError mid-training."""
    from hf_models import hf_masked_lm_dir

    model_dir = hf_masked_lm_dir(tmp_path / "hf", tokenizer_dir)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(model_dir)
    tokens = hf.config.vocab_size
    hf.resize_token_embeddings(tokens - 8)
    hf.save_pretrained(model_dir)
    with pytest.raises(SystemExit) as e:
        finetune(tmp_path / "ft", [f"pretrained={model_dir}", f"task.train_file={source_task['train']}",
                                   f"task.valid_file={source_task['valid']}", "task.label_column=source",
                                   "trainer.max_epochs=1", "export_hf=false"])
    assert str(e.value) == (f"roberta-pl-finetune: error: pretrained={model_dir}: the model's vocab_size={tokens - 8} "
                            f"is smaller than the tokenizer's {tokens} tokens ({model_dir}); pass the model's own "
                            f"tokenizer=DIR")
    assert not (tmp_path / "ft" / "checkpoints").exists()
