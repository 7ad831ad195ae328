"""roberta-pl-eval end to end: real fine-tunings of a small HF model on the local suite, a GLUE-layout directory
written here (MNLI -> RTE) and a user's YAML suite; results.json's aggregates recomputed from the per-run files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from hf_models import hf_masked_lm_dir
from hydra import compose, initialize_config_dir

from data_pipelines.demo_tasks import two_source_task
from roberta_pl.checkpoints import load_encoder
from roberta_pl.config import CONF_DIR
from roberta_pl.finetune.evaluation.config import register_configs
from roberta_pl.finetune.evaluation.evaluate import evaluate

register_configs()
# One short epoch per run: these tests check the bookkeeping, not the scores.
FAST = ["logger=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "task.max_seq_len=48",
        "export_hf=false"]


def eval_cfg(model: Path, out_dir: Path, *overrides: str, finetune=()):
    ft = ",".join(f'"{o}"' for o in [*FAST, *finetune])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"pretrained={model}", f"out_dir={out_dir}",
                                                      f"finetune=[{ft}]", *overrides])


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir) -> Path:
    """A small HF RoBERTa (hidden 64, 2 layers) with the session's tokenizer."""
    return hf_masked_lm_dir(tmp_path_factory.mktemp("model"), tokenizer_dir)


def progress(out: str) -> dict[tuple[str, int], bool]:
    """(task, seed) -> whether the run was skipped as finished, from the progress lines."""
    lines = [line for line in out.splitlines() if line.startswith("roberta-pl-eval: [")]
    found = {}
    for line in lines:
        head = line.split("] ", 1)[1].split(":")[0]  # "topics seed 1234"
        name, _, seed = head.split()
        found[(name, int(seed))] = line.endswith("(done earlier)")
    return found


def result_file(out_dir: Path, task: str, seed: int) -> Path:
    return out_dir / "tasks" / task / f"seed-{seed}" / "result.json"


@pytest.mark.slow  # eight fine-tunings, ~30 s
def test_local_suite_aggregates_its_seeds_and_resumes(tmp_path, model, capsys):
    out = tmp_path / "eval"
    cfg = eval_cfg(model, out, "suite=local", "seeds=2", "seed=7")
    summary = evaluate(cfg)
    first = progress(capsys.readouterr().out)
    tasks, seeds = ["topics", "sources", "tagging"], [7, 8]
    assert first == {(t, s): False for t in tasks for s in seeds}

    # results.json: each task's seeds are its runs' recorded scores; mean, std and the average recomputed here.
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["suite"] == "local" and saved["missing"] == []
    assert list(saved["tasks"]) == tasks and saved["seeds"] == seeds
    for name, t in saved["tasks"].items():
        runs = {s: json.loads(result_file(out, name, s).read_text()) for s in seeds}
        assert t["seeds"] == {str(s): runs[s]["score"] for s in seeds}
        assert t["mean"] == pytest.approx(statistics.fmean(t["seeds"].values()), abs=1e-12)
        assert t["std"] == pytest.approx(statistics.stdev(t["seeds"].values()), abs=1e-12)
        for s in seeds:  # a run's score is its reported metric, as the fine-tuning run's own summary has it
            metrics = json.loads((result_file(out, name, s).parent / "summary.json").read_text())["metrics"]
            assert runs[s]["score"] == pytest.approx(metrics[f"val/{t['metric']}"], abs=1e-12)
    assert saved["tasks"]["tagging"]["metric"] == "f1" and saved["tasks"]["topics"]["metric"] == "accuracy"
    assert saved["average"] == pytest.approx(statistics.fmean(t["mean"] for t in saved["tasks"].values()), abs=1e-12)
    # The five-way task has five classes.
    assert len(json.loads((result_file(out, "topics", 7).parent / "summary.json").read_text())["labels"]) == 5

    # results.md: a row per task with the same numbers, and the average.
    rows = [line.split("|")[1:-1] for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    table = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}
    for name, t in saved["tasks"].items():
        assert table[name] == [t["metric"], f"{t['mean']:.4f}", f"{t['std']:.4f}",
                               *(f"{t['seeds'][str(s)]:.4f}" for s in seeds)]
    assert table["**average**"][1] == f"**{saved['average']:.4f}**"
    assert (out / "results.png").stat().st_size > 1000  # matplotlib is installed here

    # Rerun: nothing runs again, and nothing changes.
    stamps = {(t, s): result_file(out, t, s).stat().st_mtime_ns for t in tasks for s in seeds}
    assert evaluate(cfg) == summary
    assert progress(capsys.readouterr().out) == {k: True for k in first}
    assert {k: result_file(out, *k).stat().st_mtime_ns for k in stamps} == stamps

    # A run killed before it finished (no result file) and a result file cut short both run again; the rest do not.
    result_file(out, "topics", 8).unlink()
    cut = result_file(out, "sources", 7)
    cut.write_text(cut.read_text()[:40])
    again = evaluate(cfg)
    assert progress(capsys.readouterr().out) == {k: k not in {("topics", 8), ("sources", 7)} for k in first}
    assert json.loads(cut.read_text())["seed"] == 7 and result_file(out, "topics", 8).is_file()
    assert again["tasks"]["tagging"] == summary["tasks"]["tagging"]


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(header)
        w.writerows(rows)


def tiny_glue(root: Path, texts: list[str]) -> Path:
    """MNLI and RTE in GLUE's layout (their headers, their label names), sentences from local docstrings."""
    pairs = [(a, b) for a, b in zip(texts[::2], texts[1::2])]
    nli = ["contradiction", "neutral", "entailment"]
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"]
    for name, part in (("train.tsv", pairs[:48]), ("dev_matched.tsv", pairs[48:64]), ("dev_mismatched.tsv", pairs[64:80])):
        write_tsv(root / "MNLI" / name, mnli_header,
                  [[str(i), "0", "0", "fiction", a, b, nli[i % 3], nli[i % 3]] for i, (a, b) in enumerate(part)])
    rte = ["entailment", "not_entailment"]
    for name, part in (("train.tsv", pairs[80:112]), ("dev.tsv", pairs[112:128])):
        write_tsv(root / "RTE" / name, ["index", "sentence1", "sentence2", "label"],
                  [[str(i), a, b, rte[i % 2]] for i, (a, b) in enumerate(part)])
    return root


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[str]:
    files = two_source_task(tmp_path_factory.mktemp("texts"), n_train=160, n_valid=100)
    with files["train"].open() as f, files["valid"].open() as g:
        return [row["text"].replace("\t", " ") for row in [*csv.DictReader(f), *csv.DictReader(g)]]


def test_glue_layout_rte_starts_from_the_same_seeds_mnli_model(tmp_path, model, texts, capsys, monkeypatch):
    glue = tiny_glue(tmp_path / "glue", texts)
    monkeypatch.chdir(tmp_path)  # a relative out_dir: the results name absolute paths all the same
    out = tmp_path / "eval"
    summary = evaluate(eval_cfg(model, Path("eval"), "suite=glue", f"data_dir={glue}", "tasks=[mnli,rte]", "seeds=1"))
    assert list(summary["tasks"]) == ["mnli", "rte"]
    assert "qqp/seed-1234" in summary["missing"]  # the tasks not asked for are listed, not run

    mnli = json.loads(result_file(out, "mnli", 1234).read_text())
    # MNLI's score: matched and mismatched accuracy (the latter from dev_mismatched.tsv's predictions)
    assert mnli["metric"] == "accuracy/accuracy_mm" and set(mnli["components"]) == {"accuracy", "accuracy_mm"}
    assert mnli["score"] == pytest.approx(statistics.fmean(mnli["components"].values()))
    preds = [json.loads(line) for line in (result_file(out, "mnli", 1234).parent / "predictions" / "test.jsonl").open()]
    assert len(preds) == 16 and all(p["label"] in ("contradiction", "neutral", "entailment") for p in preds)

    # RTE started from MNLI's best model of seed 1234: its export holds MNLI's best checkpoint's encoder, which
    # fine-tuning moved away from MODEL's.
    rte = json.loads(result_file(out, "rte", 1234).read_text())
    assert rte["started_from"] == mnli["hf_dir"] and Path(mnli["hf_dir"]).is_absolute()
    rte_summary = json.loads((result_file(out, "rte", 1234).parent / "summary.json").read_text())
    assert rte_summary["pretrained"] == mnli["hf_dir"]
    started = load_encoder(mnli["hf_dir"])[0].state_dict()
    best = torch.load(Path(mnli["hf_dir"]).parent / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    mnli_encoder = {k.removeprefix("model.roberta."): v for k, v in best["state_dict"].items()
                    if k.startswith("model.roberta.")}
    assert started.keys() == mnli_encoder.keys()
    for k in started:
        torch.testing.assert_close(started[k], mnli_encoder[k], rtol=0, atol=1e-6)
    original = load_encoder(model)[0].state_dict()
    assert any(not torch.allclose(original[k], started[k]) for k in started)

    # A task whose GLUE files are not there: one line naming the file; what was done is kept.
    with pytest.raises(SystemExit) as e:
        evaluate(eval_cfg(model, out, "suite=glue", f"data_dir={glue}", "tasks=[qqp]", "seeds=1"))
    assert str(e.value).startswith("roberta-pl-eval: error: ") and "\n" not in str(e.value)
    assert f"task.train_file={glue}/QQP/train.tsv: no such file" in str(e.value)
    assert result_file(out, "rte", 1234).is_file()


def test_a_users_yaml_suite(tmp_path, model, capsys):
    files = two_source_task(tmp_path / "data", n_train=64, n_valid=40)
    suite = tmp_path / "mine.yaml"
    suite.write_text(f"- name: mine\n  train_file: {files['train']}\n  valid_file: {files['valid']}\n"
                     f"  label_column: source\n  report: [accuracy, f1]\n  finetune: [batch_size=8]\n")
    out = tmp_path / "eval"
    summary = evaluate(eval_cfg(model, out, f"suite={suite}", "seeds=1"))
    task = summary["tasks"]["mine"]
    run = json.loads((result_file(out, "mine", 1234).parent / "summary.json").read_text())
    assert task["metric"] == "accuracy/f1" and summary["average"] == task["mean"]
    assert task["seeds"]["1234"] == pytest.approx((run["metrics"]["val/accuracy"] + run["metrics"]["val/f1"]) / 2)
    assert run["global_step"] == 8  # batch_size=8 from the task's own overrides: 64 examples, one epoch

    # Bad input: one line naming the file, task and field; an unknown suite and an unknown task name their choices.
    suite.write_text(suite.read_text().replace("label_column", "label_colum"))
    for overrides, message in (([f"suite={suite}"], f"{suite}, task 1: unknown field 'label_colum'"),
                               (["suite=nope"], "suite=nope: neither a suite (glue, local) nor a YAML file"),
                               (["suite=local", "tasks=[nope]"], "tasks=nope: no such task in suite=local"),
                               ):
        with pytest.raises(SystemExit) as e:
            evaluate(eval_cfg(model, out, *overrides))
        assert str(e.value).startswith("roberta-pl-eval: error: ") and message in str(e.value), str(e.value)
    with pytest.raises(SystemExit) as e:
        evaluate(eval_cfg(tmp_path / "data", out, "suite=local"))  # a directory that is not a model
    assert f"pretrained={tmp_path / 'data'}" not in str(e.value) and f"MODEL={tmp_path / 'data'}: not a model" in str(e.value)


@pytest.mark.slow  # a fresh interpreter: ~20 s of imports on a loaded 2-core machine
def test_command_line_takes_model_first_and_fails_in_one_line(tmp_path):
    import subprocess
    import sys

    from roberta_pl.finetune.evaluation.app import model_argument

    assert model_argument(["-m", "m.ckpt", "seeds=2"]) == ["-m", "pretrained=m.ckpt", "seeds=2"]
    assert model_argument(["--cfg", "job", "m.ckpt"]) == ["--cfg", "job", "pretrained=m.ckpt"]
    assert model_argument(["pretrained=m.ckpt"]) == ["pretrained=m.ckpt"]
    done = subprocess.run([sys.executable, "-m", "roberta_pl.finetune.evaluation.app", str(tmp_path / "nope"),
                           "suite=local", "seeds=2", f"out_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"roberta-pl-eval: error: MODEL={tmp_path / 'nope'}: no such file or directory"


def one_task_suite(tmp_path: Path, report: str = "[accuracy]", extra: str = "") -> Path:
    """A user's suite of one small task (64 training examples): one short fine-tuning a run."""
    files = two_source_task(tmp_path / "data", n_train=64, n_valid=40)
    suite = tmp_path / "one.yaml"
    suite.write_text(f"- name: one\n  train_file: {files['train']}\n  valid_file: {files['valid']}\n"
                     f"  label_column: source\n  report: {report}\n  finetune: [batch_size=16]\n{extra}")
    return suite


def refused(cfg) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate(cfg)
    message = str(e.value)
    assert message.startswith("roberta-pl-eval: error: ") and "\n" not in message, message
    return message


def test_an_out_dir_holds_one_models_results(tmp_path, model, tokenizer_dir, capsys):
    """A second model, init, fine-tuning override or task in the same out_dir is refused before any training,
    instead of reporting the first one's scores "(done earlier)" under its name; only a changed `report:` is scored
    again from the finished fine-tuning, with no training."""
    suite, out = one_task_suite(tmp_path), tmp_path / "eval"
    first = evaluate(eval_cfg(model, out, f"suite={suite}", "seeds=1"))
    recorded = json.loads((out / "eval.json").read_text())
    assert recorded["model"] == str(model.resolve()) and recorded["init"] == "pretrained"
    assert json.loads(result_file(out, "one", 1234).read_text())["fingerprint"]["model"] == str(model.resolve())
    best = result_file(out, "one", 1234).parent / "checkpoints" / "best.ckpt"
    stamp = best.stat().st_mtime_ns

    other = hf_masked_lm_dir(tmp_path / "other", tokenizer_dir, seed=1)
    assert f"out_dir={out.resolve()} holds results of MODEL={model.resolve()}" in refused(
        eval_cfg(other, out, f"suite={suite}", "seeds=1"))
    assert "holds results run with init=pretrained" in refused(eval_cfg(model, out, f"suite={suite}", "seeds=1",
                                                                       "init=random"))
    assert "holds results run with finetune=" in refused(eval_cfg(model, out, f"suite={suite}", "seeds=1",
                                                                  finetune=["optim.lr=1e-4"]))
    (tmp_path / "eval.json.bak").write_text((out / "eval.json").read_text())
    (out / "eval.json").unlink()  # the per-run records refuse it too
    assert "holds results of MODEL=" in refused(eval_cfg(other, out, f"suite={suite}", "seeds=1"))
    assert not (out / "eval.json").exists()  # a refused run claims nothing
    (out / "eval.json").write_text((tmp_path / "eval.json.bak").read_text())
    suite.write_text(suite.read_text().replace("batch_size=16", "batch_size=8"))
    assert "holds a run of task one with another finetune" in refused(eval_cfg(model, out, f"suite={suite}", "seeds=1"))
    assert best.stat().st_mtime_ns == stamp and not (out / "tasks" / "one" / "seed-1235").exists()

    # Another report: scored from the finished fine-tuning's summary, not trained again.
    suite.write_text(suite.read_text().replace("batch_size=8", "batch_size=16").replace("[accuracy]", "[accuracy, f1]"))
    capsys.readouterr()
    again = evaluate(eval_cfg(model, out, f"suite={suite}", "seeds=1"))
    assert "one seed 1234: scoring the finished fine-tuning" in capsys.readouterr().out
    assert best.stat().st_mtime_ns == stamp
    metrics = json.loads((best.parent.parent / "summary.json").read_text())["metrics"]
    assert again["tasks"]["one"]["metric"] == "accuracy/f1" and first["tasks"]["one"]["metric"] == "accuracy"
    assert again["tasks"]["one"]["mean"] == pytest.approx((metrics["val/accuracy"] + metrics["val/f1"]) / 2)


def test_default_out_dir_names_the_model(tmp_path, model):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"pretrained={tmp_path / 'base' / 'checkpoints' / 'last.ckpt'}",
                                                     "init=random"])
    assert cfg.out_dir == "runs/eval-base-last-random"


@pytest.mark.parametrize("extra,finetune,message", [
    ("  extra_valid: {a: x.csv, b: y.csv}\n", [], "task one: extra_valid names 2 files; a task scores one"),
    ("", ["seed=3"], "finetune: seed=3: roberta-pl-eval sets seed for each run; use seed= and seeds="),
    ("", ["+init=random"], "finetune: +init=random: roberta-pl-eval sets init"),
    ("", ["run_dir=/tmp/x"], "finetune: run_dir=/tmp/x: roberta-pl-eval sets run_dir for each run; use out_dir="),
    ("", ["task=sst2"], "finetune: task=sst2: roberta-pl-eval sets task"),
    ("", ["overwrite=false"], "finetune: overwrite=false: roberta-pl-eval sets overwrite"),
    ("  finetune: [pretrained=/x]\n", [], "task one, finetune: pretrained=/x: roberta-pl-eval sets pretrained"),
])
def test_suite_and_override_mistakes_are_refused_before_training(tmp_path, model, extra, finetune, message):
    suite = one_task_suite(tmp_path, extra=extra)
    if "finetune:" in extra:  # the task's own overrides: a second `finetune:` key replaces the first
        suite.write_text(suite.read_text().replace("  finetune: [batch_size=16]\n", ""))
    out = tmp_path / "eval"
    assert message in refused(eval_cfg(model, out, f"suite={suite}", "seeds=1", finetune=finetune))
    assert not (out / "tasks").exists()


def test_a_report_metric_the_task_has_not_is_refused_before_training(tmp_path, model):
    out = tmp_path / "eval"
    message = refused(eval_cfg(model, out, f"suite={one_task_suite(tmp_path, report='[accuracy, pearson]')}"))
    assert "task one: report: pearson is not a metric of this task (accuracy, f1, mcc, loss)" in message
    assert not (out / "tasks").exists()


def test_model_path_with_an_equals_sign(tmp_path, model):
    import shutil

    from roberta_pl.finetune.evaluation.app import model_argument

    ckpt = tmp_path / "epoch=0-step=100"
    shutil.copytree(model, ckpt)
    argv = model_argument([str(ckpt), "suite=local", "seeds=2"])
    assert argv[1:] == ["suite=local", "seeds=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert compose(config_name="eval", overrides=argv).pretrained == str(ckpt)
    assert model_argument(["seeds=2", "out_dir=x"]) == ["seeds=2", "out_dir=x"]  # not on disk: an override


def test_random_init_chains_load_the_earlier_tasks_model(tmp_path, model, texts):
    """init=random: MNLI from scratch, then RTE from that fine-tuned MNLI model (the same chain as the pretrained
    run's), not RTE from scratch as well."""
    from roberta_pl.finetune.evaluation.runner import finetune_config
    from roberta_pl.finetune.evaluation.suites import load_suite

    glue = tiny_glue(tmp_path / "glue", texts)
    cfg = eval_cfg(model, tmp_path / "eval", "suite=glue", f"data_dir={glue}", "init=random")
    tasks = {t.name: t for t in load_suite("glue", str(glue), tmp_path / "eval")}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        mnli, _ = finetune_config(cfg, tasks["mnli"], 1234, tmp_path / "eval", str(model), export=True)
        rte, _ = finetune_config(cfg, tasks["rte"], 1234, tmp_path / "eval", str(tmp_path / "mnli-hf"), export=False)
    assert (mnli.init, rte.init) == ("random", "pretrained")
