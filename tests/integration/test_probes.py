"""Live downstream probes during pretraining (probe.*): every sink under the step that computed it, no effect on
training, ranks that agree, and bad configs refused before any work. Real Trainer, real shards, a real labelled task
(data_pipelines.demo_tasks: which part of the standard library a docstring comes from)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_pretrain import TINY, compose_cfg

from data_pipelines.demo_tasks import two_source_task
from roberta_pl.pretraining.app import run

HERE = Path(__file__).resolve().parent
ACCURACY = "probe/sources/accuracy"


@pytest.fixture(scope="module")
def probe_task(tmp_path_factory) -> dict[str, Path]:
    return two_source_task(tmp_path_factory.mktemp("probe_task"), n_train=120, n_valid=60)


@pytest.fixture
def data_overrides(shard_dir, tokenizer_dir):
    return [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]


def probe_overrides(task: dict[str, Path], every: int = 2, **extra) -> list[str]:
    spec = f"{{name:sources,train_file:{task['train']},valid_file:{task['valid']},label_column:source}}"
    return [f"probe.every_n_steps={every}", f"probe.tasks=[{spec}]", *(f"probe.{k}={v}" for k, v in extra.items())]


def train(out_dir: Path, overrides) -> dict:
    return run(compose_cfg([*TINY, *overrides]), out_dir)


def history_probes(run_dir: Path) -> dict[int, float]:
    history = json.loads((run_dir / "metrics_history.json").read_text())
    return {h["step"]: h[ACCURACY] for h in history if ACCURACY in h}


def sink_probes(run_dir: Path, logger: str) -> list[tuple[int, float]]:
    """(step, value) of every probe/sources/accuracy record the logger wrote, in order."""
    if logger == "csv":
        rows = csv.DictReader(open(next((run_dir / "csv").glob("version_*/metrics.csv"))))
        return [(int(r["step"]), float(r[ACCURACY])) for r in rows if r.get(ACCURACY)]
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        events = EventAccumulator(str(next((run_dir / "tensorboard").glob("version_*")))).Reload()
        return [(e.step, e.value) for e in events.Scalars(ACCURACY)]
    from wandb_records import history_and_config

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    rows, _ = history_and_config(next((run_dir / "wandb").glob(f"offline-run-*-{run_id}")) / f"run-{run_id}.wandb")
    return [(r["trainer/global_step"], r[ACCURACY]) for r in rows if ACCURACY in r]


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_a_probe_appears_in_every_sink_under_the_step_that_computed_it(tmp_path, data_overrides, probe_task, logger):
    # Probes every 2 steps, logging every 3: a probe reaches the loggers whether or not its step is a logging step.
    train(tmp_path, [*data_overrides, *probe_overrides(probe_task), f"logger={logger}", "trainer.log_every_n_steps=3"])
    history = history_probes(tmp_path)
    assert sorted(history) == [2, 4, 6]
    assert all(0.0 <= v <= 1.0 for v in history.values()), history
    logged = sink_probes(tmp_path, logger)
    assert [s for s, _ in logged] == [2, 4, 6], logged  # once each, numbered as metrics_history.json numbers them
    for step, value in logged:
        assert value == pytest.approx(history[step], abs=1e-6), (step, value, history)
    if logger == "csv":  # train metrics keep their own steps beside the probes
        rows = list(csv.DictReader(open(next((tmp_path / "csv").glob("version_*/metrics.csv")))))
        assert [int(r["step"]) for r in rows if r.get("train/loss")] == [3, 6]
        assert [int(r["step"]) for r in rows if r.get("probe/seconds")] == [2, 4, 6]


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


# The fine-tune's run is slow-marked: in the fast suite, the RNG test below checks it leaves weights, mode and RNG as
# they were.
@pytest.mark.parametrize("method", ["linear", pytest.param("finetune", marks=pytest.mark.slow)])
def test_probes_leave_training_as_it_was(tmp_path, data_overrides, probe_task, method):
    # The same seed with and without probes every step: the same weights, optimizer state and losses, bit for bit
    # (dropout 0.1 trains on: a probe that left the encoder in eval mode, trained it or drew from the training RNG
    # would show here).
    common = [*data_overrides, "trainer.max_steps=4", "trainer.val_every_n_steps=2"]
    train(tmp_path / "plain", common)
    train(tmp_path / "probed", [*common, *probe_overrides(probe_task, every=1, method=method, finetune_steps=3)])
    assert sorted(history_probes(tmp_path / "probed")) == [1, 2, 3, 4]
    a, b = final_state(tmp_path / "plain"), final_state(tmp_path / "probed")
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    losses = [json.loads((tmp_path / d / "metrics_history.json").read_text()) for d in ("plain", "probed")]
    assert [h for h in losses[0] if "train_loss" in h or "val_loss" in h] == \
        [h for h in losses[1] if "train_loss" in h or "val_loss" in h]


@pytest.mark.parametrize("method, architecture", [("linear", "roberta"), ("finetune", "roberta"),
                                                  ("finetune", "modernbert")])
def test_a_probe_draws_nothing_from_the_rng_and_scores_the_same_twice(tokenizer_dir, probe_task, method, architecture):
    # The training path reseeds dropout every micro-batch, so the run above cannot see the RNG; this can.
    from roberta_pl.callbacks.probes import LiveProbe
    from roberta_pl.pretraining.module import MaskedLMModule

    model = dict(vocab_size=800, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64,
                 dropout=0.1, architecture=architecture)
    module = MaskedLMModule(model=model, optim={}, max_steps=1, seq_len=64, micro_batch_size=4,
                            tokenizer=str(tokenizer_dir))
    probe = LiveProbe(compose_cfg([*TINY, *probe_overrides(probe_task, method=method, finetune_steps=3)]).probe)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    probe.setup(trainer, module, "fit")
    assert [len(probe.tasks[0].train), len(probe.tasks[0].valid)] == [120, 60]
    module.train()
    torch.manual_seed(7)
    rng, weights = torch.get_rng_state(), {k: v.clone() for k, v in module.state_dict().items()}
    first = probe.run(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng) and module.model.training
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())
    torch.manual_seed(8)  # another training RNG state: the probe's own seed decides
    assert probe.run(trainer, module)[ACCURACY] == first[ACCURACY]


def test_the_logistic_regression_scores_what_the_features_carry():
    from roberta_pl.probe import logistic_regression_accuracy

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 16, generator=g), torch.randint(0, 3, (400,), generator=g)
    separable = x + 8.0 * torch.nn.functional.one_hot(y, 16).float()  # class c shifts feature c
    assert logistic_regression_accuracy(separable[:300], y[:300], separable[300:], y[300:], 3) == 1.0
    chance = logistic_regression_accuracy(x[:300], y[:300], x[300:], y[300:], 3)  # labels unrelated to features
    assert 0.15 < chance < 0.55, chance


def test_a_resumed_run_probes_at_the_same_steps_with_the_same_scores(tmp_path, data_overrides, probe_task):
    common = [*data_overrides, *probe_overrides(probe_task), "trainer.max_steps=6", "checkpoint.every_n_steps=2"]
    train(tmp_path / "straight", common)
    train(tmp_path / "resumed", [*common, "trainer.stop_at_step=4"])
    train(tmp_path / "resumed", common)
    straight, resumed = history_probes(tmp_path / "straight"), history_probes(tmp_path / "resumed")
    assert sorted(straight) == [2, 4, 6] and resumed == straight  # step 4's probe is in the step-4 checkpoint
    assert len(set(straight.values())) > 1 or straight[2] != 0.5  # scores of a model, not a constant


class RecordProbes(pl.Callback):
    """Writes each rank's own probe results (``LiveProbe.results``) to ``<out_dir>/probes-rank<r>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from roberta_pl.callbacks.probes import LiveProbe

        probe = next(c for c in trainer.callbacks if isinstance(c, LiveProbe))
        (self.out_dir / f"probes-rank{trainer.global_rank}.json").write_text(json.dumps(probe.results))


@pytest.mark.slow
def test_two_ddp_ranks_compute_the_same_probe_and_log_it_once(tmp_path, shard_dir, tokenizer_dir, probe_task):
    record = f"trainer.callbacks=[{{_target_:test_probes.RecordProbes,out_dir:{tmp_path}}}]"
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", *TINY, f"data.train_shards={shard_dir}",
           f"data.tokenizer={tokenizer_dir}", "trainer.devices=2", "trainer.strategy=ddp", "batch.micro_batch_size=2",
           "trainer.max_steps=4", "trainer.val_every_n_steps=1000", "export_hf=false", f"run_dir={tmp_path}",
           *probe_overrides(probe_task), record]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "helpers"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probes-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [2, 4]
    assert [r[ACCURACY] for r in ranks[0]] == [r[ACCURACY] for r in ranks[1]]  # the same weights, the same score
    assert sink_probes(tmp_path, "csv") == [(r["step"], pytest.approx(r[ACCURACY])) for r in ranks[0]]  # once
    assert sorted(history_probes(tmp_path)) == [2, 4]


def write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.mark.parametrize("case", ["missing_file", "no_valid_file", "no_tasks", "one_label", "unseen_label",
                                  "zero3", "bad_name"])
def test_a_bad_probe_config_fails_before_any_work_naming_the_field_or_file(tmp_path, data_overrides, probe_task, case):
    task = dict(probe_task)
    extra: list[str] = []
    if case == "missing_file":
        task["train"] = tmp_path / "nowhere.csv"
        expected = f"probe.tasks.0.train_file={task['train']}: no such file"
    elif case == "one_label":
        task["train"] = write(tmp_path / "one.csv", [["text", "source"], ["a b", "web"], ["c d", "web"]])
        expected = f"{task['train']}: only one label"
    elif case == "unseen_label":
        task["valid"] = write(tmp_path / "valid.csv", [["text", "source"], ["a b", "web"], ["c d", "sports"]])
        expected = f"{task['valid']}, line 3: label 'sports' never seen in training"
    elif case == "zero3":
        extra = ["trainer=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.devices=1"]
        expected = "not supported with trainer.deepspeed.stage=3"
    overrides = probe_overrides(task)
    if case == "no_valid_file":
        overrides[1] = f"probe.tasks=[{{name:sources,train_file:{task['train']},label_column:source}}]"
        expected = "probe.tasks.0.valid_file is required"
    elif case == "no_tasks":
        overrides = ["probe.every_n_steps=5"]
        expected = "probe.every_n_steps=5 but probe.tasks is empty"
    elif case == "bad_name":
        overrides[1] = overrides[1].replace("name:sources", "name:'a b'")
        expected = "probe.tasks.0.name='a b': a unique name"
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", [*data_overrides, *overrides, *extra])
    message = str(e.value)
    assert message.startswith("roberta-pl-train: error: ") and "\n" not in message, message
    assert expected in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("what", ["method", "kind"])
def test_an_unknown_probe_method_or_task_kind_fails_when_composed(probe_task, what):
    # Typed choices: Hydra refuses the value naming the field and the allowed ones, before anything runs.
    from hydra.errors import ConfigCompositionException

    overrides = probe_overrides(probe_task)
    if what == "method":
        overrides.append("probe.method=ridge")
        field, allowed = "probe.method", "[linear, finetune]"
    else:  # fine-tuning's other task kind: a probe scores one label per text
        overrides[1] = overrides[1].replace("label_column:source", "label_column:source,kind:token_classification")
        field, allowed = "kind", "[sequence_classification]"
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg([*TINY, *overrides])
    text = f"{e.value} {e.value.__cause__}"
    assert field in text and allowed in text, text
