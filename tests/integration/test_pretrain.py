"""End-to-end pretraining through the real entry point: real Trainer, real shards, real checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from roberta_pl.checkpoints import load_pretrained
from roberta_pl.config import CONF_DIR
from roberta_pl.hf import load_hf
from roberta_pl.pretraining.app import run
from roberta_pl.pretraining.config import register_configs

register_configs()
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_seq_len=64", "batch.seq_len=64", "batch.global_batch_size=8", "batch.micro_batch_size=4",
        "trainer=cpu", "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2",
        "data.num_workers=0", "fill_mask=[]", "logger=csv"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


@pytest.fixture
def data_overrides(shard_dir, tokenizer_dir):
    return [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]


def train(out_dir: Path, overrides) -> dict:
    return run(compose_cfg([*TINY, *overrides]), out_dir)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_trains_at_tiny_size(tmp_path, data_overrides, experiment):
    # The experiment's own model/batch/trainer are replaced by tiny CPU ones; its optimizer, schedule,
    # logger choice and data settings are what is exercised.
    summary = train(tmp_path, [f"experiment={experiment}", *TINY, *data_overrides, "logger=csv"])
    assert summary["global_step"] == 6
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == summary_vocab(tmp_path)


def summary_vocab(run_dir: Path) -> int:
    return json.loads((run_dir / "hf" / "config.json").read_text())["vocab_size"]


def test_exact_resume_matches_uninterrupted_run(tmp_path, data_overrides):
    steps = ["trainer.max_steps=8", "checkpoint.every_n_steps=2", "trainer.val_every_n_steps=4"]
    train(tmp_path / "straight", [*data_overrides, *steps])
    train(tmp_path / "resumed", [*data_overrides, *steps, "trainer.stop_at_step=4"])
    stopped = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 4
    train(tmp_path / "resumed", [*data_overrides, *steps])  # resume=auto picks up last.ckpt
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # bit for bit on CPU
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    # The loss curve continued rather than restarted: the same training points as the uninterrupted run.
    # (Lightning saves the step-k checkpoint before step k's validation, so that one validation point is
    # not in the resumed curve; the others are.)
    ha = json.loads((tmp_path / "straight" / "metrics_history.json").read_text())
    hb = json.loads((tmp_path / "resumed" / "metrics_history.json").read_text())
    assert [h for h in ha if "train_loss" in h] == [h for h in hb if "train_loss" in h]
    assert [h for h in hb if "val_loss" in h] == [h for h in ha if "val_loss" in h and h["step"] != 4]


def test_epoch_ends_never_step_on_a_partial_accumulation(tmp_path, data_overrides):
    from data_pipelines.datamodule import MLMDataModule

    shards, tokenizer = data_overrides[0].split("=", 1)[1], data_overrides[2].split("=", 1)[1]
    raw = MLMDataModule(shards, tokenizer).connect(64, 4).batches_per_epoch_per_rank
    accumulation = next(a for a in range(2, 12) if raw % a)  # an epoch that does not end on a whole step
    per_epoch = MLMDataModule(shards, tokenizer).connect(64, 4, accumulation=accumulation).batches_per_epoch_per_rank
    assert per_epoch % accumulation == 0 and raw - per_epoch < accumulation
    steps = per_epoch // accumulation + 4
    train(tmp_path, [*data_overrides, f"batch.global_batch_size={4 * accumulation}", f"trainer.max_steps={steps}",
                     "trainer.val_every_n_steps=1000", "checkpoint.every_n_steps=1000", "trainer.log_every_n_steps=50"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] >= 1  # crossed an epoch boundary
    # Every optimizer step, the one at the epoch end included, summed exactly `accumulation` micro-batches.
    assert ckpt["MLMDataModule"]["consumed"] == accumulation * steps


def test_batch_ramp_grows_the_global_batch_on_schedule(tmp_path, data_overrides):
    # Global batch 4 (accumulation 1) until step 4, then 8 (accumulation 2), micro-batch 4 throughout.
    train(tmp_path, [*data_overrides, "batch.ramp=[[4,4]]", "trainer.max_steps=8", "trainer.val_every_n_steps=2"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    assert ckpt["MLMDataModule"]["consumed"] == 4 * 1 + 4 * 2
    # Validation after every 2nd optimizer step, across the switch (a micro-batch interval fixed at the
    # final accumulation validated after steps 4, 6 and 8).
    history = json.loads((tmp_path / "metrics_history.json").read_text())
    assert [h["step"] for h in history if "val_loss" in h] == [2, 4, 6, 8]


@pytest.mark.parametrize("data", [dict(pack_mode="full_sentences", strategy="whole_word"), dict(pack_mode="doc", strategy="span"),
                                  pytest.param(dict(pack_mode="packed_docs", strategy="whole_word"), marks=pytest.mark.slow)],
                         ids=["full_sentences-whole_word", "doc-span", "packed_docs-whole_word"])
def test_accumulation_splits_take_the_same_steps_on_the_mean_masked_token_loss(tmp_path, shard_dir, tokenizer_dir, data):
    # The same 16 real sequences per step as 1 x 16, 2 x 8 and 4 x 4 micro-batches (tests/integration/test_ddp.py
    # adds ranks). The step's gradient is that of the cross-entropy averaged over every masked token of the
    # global batch (the denominator was mask_prob x tokens, specials included: 2-6% off, and split-dependent
    # in doc packing), and every split takes the same steps.
    from ddp_equivalence_job import main, masked_rows, mean_ce_gradient

    torch.save(masked_rows(shard_dir, tokenizer_dir, seq_len=32, **data), tmp_path / "rows.pt")
    rows = torch.load(tmp_path / "rows.pt", weights_only=True)
    splits = [(16, 1), (8, 2), (4, 4)]
    for micro, accumulation in splits:
        main(str(tmp_path / f"{micro}x{accumulation}"), 1, accumulation, micro, str(tmp_path / "rows.pt"))
    init = torch.load(tmp_path / "16x1" / "init.pt", weights_only=True)
    expected = mean_ce_gradient(init, rows)
    final = {s: torch.load(tmp_path / f"{s[0]}x{s[1]}" / "final.pt", weights_only=True) for s in splits}
    for split in splits:
        gradient = torch.load(tmp_path / f"{split[0]}x{split[1]}" / "first_gradient.pt", weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(gradient[k], v, rtol=1e-4, atol=1e-7, msg=f"{split}: {k}")
        for k, v in final[splits[0]].items():
            torch.testing.assert_close(final[split][k], v, rtol=1e-5, atol=1e-6, msg=f"{split}: {k}")


def test_batches_without_a_step_window_give_the_mean_of_micro_batch_means(tmp_path):
    # A plain DataLoader (no look-ahead count): each micro-batch is its own mean, and the step averages them.
    from ddp_equivalence_job import main, mean_ce_gradient, random_rows

    main(str(tmp_path), 1, 4, 4, None, windows=False)
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    gradient = torch.load(tmp_path / "first_gradient.pt", weights_only=True)
    expected, pooled = mean_ce_gradient(init, random_rows(), parts=4), mean_ce_gradient(init, random_rows())
    for k, v in expected.items():
        torch.testing.assert_close(gradient[k], v, rtol=1e-4, atol=1e-7, msg=k)
    assert any(not torch.allclose(pooled[k], v, rtol=1e-3) for k, v in expected.items())  # the two are told apart


def test_wandb_offline_run_files_hold_metrics_and_resume_same_run(tmp_path, data_overrides):
    from wandb_records import history_and_config

    train(tmp_path, [*data_overrides, "logger=wandb", "trainer.stop_at_step=4"])
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    rows, config = history_and_config(runs[0] / f"run-{run_id}.wandb")
    logged = set().union(*rows)
    assert {"train/loss", "train/accuracy", "train/grad_norm", "val/loss", "val/accuracy", "val/perplexity",
            "perf/tokens_per_sec", "lr-AdamW/pg1"} <= logged
    assert config["batch"]["global_batch_size"] == 8 and config["optim"]["warmup_steps"] == 100  # resolved config
    last_step = max(r["trainer/global_step"] for r in rows)
    # Resume: the same W&B run id, a second offline segment that continues the steps.
    train(tmp_path, [*data_overrides, "logger=wandb"])
    again = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(again) == 2 and (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id
    rows2, _ = history_and_config(again[-1] / f"run-{run_id}.wandb")
    steps = [r["trainer/global_step"] for r in rows2 if "train/loss" in r]
    # Numbered by optimizer step, as the checkpoints and metrics_history.json are; one record per step.
    assert min(steps) > last_step and max(steps) == 6 and len(steps) == len(set(steps)), steps


def test_metrics_are_logged_once_per_optimizer_step_under_the_same_step_number_everywhere(tmp_path, data_overrides):
    # Accumulation 2, a logging step every 2 optimizer steps, validation every 3. Lightning flags every
    # micro-batch of a logging step, and numbers records by the steps completed *before* the current one.
    import csv

    train(tmp_path, [*data_overrides, "trainer.log_every_n_steps=2", "trainer.val_every_n_steps=3"])
    rows = list(csv.DictReader(open(next((tmp_path / "csv").glob("version_*/metrics.csv")))))
    at = lambda key: [int(r["step"]) for r in rows if r[key]]  # noqa: E731
    assert at("train/loss") == [2, 4, 6] and at("perf/tokens_per_sec") == [2, 4, 6]
    assert at("lr-AdamW/pg1") == [2, 4, 6]  # the learning-rate monitor too, not once per micro-batch
    assert at("val/loss") == [3, 6]
    history = json.loads((tmp_path / "metrics_history.json").read_text())
    assert [h["step"] for h in history if "train_loss" in h] == [2, 4, 6]
    assert [h["step"] for h in history if "val_loss" in h] == [3, 6]
    # The run summary says how much of an epoch equal steps per rank leave unused: under one global batch (8).
    unused = json.loads((tmp_path / "summary.json").read_text())["data"]["unused_per_epoch"]
    assert unused["total_blocks"] > 100 and 0 <= unused["blocks"] < 8, unused
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved and set(saved) <= {f"step-{s:07d}.ckpt" for s in (2, 4, 6)} and saved[-1] == "step-0000006.ckpt"


def test_train_loss_is_the_mean_over_the_masked_tokens_of_each_step(tmp_path, data_overrides):
    # The logged loss of a step is the objective it optimized: the cross-entropy averaged over every masked token
    # of its micro-batches (each micro-batch's mean loss and masked count as the model computed them, read by a
    # forward hook), not the last micro-batch's, nor a plain mean of micro-batch means. Doc packing with span
    # masking (micro-batches mask unequal numbers of tokens) and a batch ramp (accumulation 1, then 2), so the
    # loader's look-ahead windows must follow the trainer's steps.
    import csv

    record = tmp_path / "losses.jsonl"
    cb = f"trainer.callbacks=[{{_target_:reliability_faults.RecordLosses,path:'{record}'}}]"
    overrides = [*TINY, *data_overrides, "data.packing=doc", "data.masking=span", "batch.ramp=[[2,4]]",
                 "trainer.max_steps=4", cb]
    run(compose_cfg(overrides), tmp_path, overrides=[cb])
    rows = list(csv.DictReader(open(next((tmp_path / "csv").glob("version_*/metrics.csv")))))
    logged = {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}
    losses = [json.loads(x) for x in record.read_text().splitlines()]
    plain_means = []
    for step in (1, 2, 3, 4):
        window = [x for x in losses if x["step"] == step]
        assert len(window) == (1 if step <= 2 else 2)
        mean = sum(x["loss"] * x["masked"] for x in window) / sum(x["masked"] for x in window)
        assert abs(logged[step] - mean) < 1e-5, (step, logged[step], window)
        plain_means.append(abs(logged[step] - sum(x["loss"] for x in window) / len(window)))
    assert max(plain_means) > 1e-4  # the masked counts differed: the test tells the two means apart


def test_tokens_per_second_counts_real_tokens_not_padding(tmp_path, data_overrides):
    # Doc mode pads every document to the block: the throughput figures count only real tokens.
    import csv

    record = tmp_path / "batches.jsonl"
    cb = f"trainer.callbacks=[{{_target_:reliability_faults.RecordBatches,path:'{record}'}}]"
    run(compose_cfg([*TINY, *data_overrides, "data.packing=doc", "trainer.max_steps=4", cb]), tmp_path, overrides=[cb])
    rows = list(csv.DictReader(open(next((tmp_path / "csv").glob("version_*/metrics.csv")))))
    logged = [float(r["perf/tokens_trained"]) for r in rows if r["perf/tokens_trained"]]
    real = sum(json.loads(x)["tokens"] for x in record.read_text().splitlines())
    positions = 4 * 2 * 4 * 64  # steps x accumulation x micro batch x seq_len
    assert logged[-1] == real < 0.9 * positions, (logged, real, positions)


def test_tensorboard_logger_writes_scalars_by_optimizer_step(tmp_path, data_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, [*data_overrides, "logger=tensorboard", "trainer.log_every_n_steps=2"])
    events = EventAccumulator(str(next((tmp_path / "tensorboard").glob("version_*")))).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/loss", "perf/tokens_per_sec"} <= set(tags) and "hp_metric" not in tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6]


def test_rerunning_a_finished_run_keeps_its_outputs_and_a_larger_max_steps_extends_it(tmp_path, data_overrides, capsys):
    import warnings

    first = train(tmp_path, [*data_overrides, "logger=wandb"])
    summary = (tmp_path / "summary.json").read_bytes()
    assert json.loads(summary)["metrics"]["val/loss"] > 0
    segments = sorted((tmp_path / "wandb").glob("offline-run-*"))
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = train(tmp_path, [*data_overrides, "logger=wandb"])
    out = capsys.readouterr().out
    assert "already finished" in out and "step 6, trainer.max_steps=6" in out and "Nothing was changed" in out
    assert (tmp_path / "summary.json").read_bytes() == summary and again["metrics"] == first["metrics"]
    assert sorted((tmp_path / "wandb").glob("offline-run-*")) == segments  # no second, empty W&B run
    assert not [w for w in caught if "weights_only" in str(w.message)]
    # Raising max_steps continues the same run from its last checkpoint.
    more = train(tmp_path, [*data_overrides, "logger=wandb", "trainer.max_steps=8"])
    assert more["global_step"] == 8 and "Resuming from" in capsys.readouterr().out
    assert len(sorted((tmp_path / "wandb").glob("offline-run-*"))) == len(segments) + 1


def test_zero_steps_claims_no_checkpoint(tmp_path, data_overrides, capsys):
    train(tmp_path, [*data_overrides, "trainer.max_steps=0", "export_hf=false"])
    out = capsys.readouterr().out
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and "last.ckpt" not in out


def test_checkpoint_loads_weights_only_and_exports(tmp_path, data_overrides):
    from roberta_pl.cli.export import main as export_main

    train(tmp_path, [*data_overrides, "export_hf=false"])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    torch.load(ckpt, weights_only=True)  # no pickled code needed to read it
    export_main([str(ckpt), str(tmp_path / "exported")])
    ours, tok_dir = load_pretrained(ckpt)
    ids = torch.tensor([[0, 10, 11, 4, 12, 2]])
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    assert load_hf(tmp_path / "exported").config.vocab_size == ours.config.vocab_size
    assert (tmp_path / "exported" / "tokenizer.json").exists()  # the tokenizer travels with the export


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("batch.global_batch_size=33", "global_batch_size=33 is not divisible"),
    ("batch.seq_len=600", "batch.seq_len=600 exceeds model.max_seq_len=128"),
    ("trainer=deepspeed_zero2", "trainer.accelerator=gpu but no CUDA GPU is visible"),
    ("model.vocab_size=100", "the tokenizer has"),
    ("model.hiden_size=3", "hiden_size"),
    ("+optim.lrr=1e-3", "unknown config key optim.lrr; did you mean optim.lr?"),  # `+` bypasses the schema
    ("model.hidden_size=101", "model.hidden_size=101 is not divisible by model.num_heads=2; use a multiple of 2"),
    ("optim.lr=-1e-3", "optim.lr=-0.001: the peak learning rate must be positive"),
])
def test_cli_bad_config_is_one_line_error(tmp_path, override, message, shard_dir, tokenizer_dir):
    data = [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    proc = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", override, f"run_dir={tmp_path}/run", *data],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    if "hiden" not in override:  # our own checks: exactly one line, no traceback
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow  # ~5-15 s: the full suite runs it, make test-fast does not
def test_cli_prints_no_notices_that_do_not_apply(tmp_path, data_overrides):
    # What a user sees before the first step: our model line, not Lightning's srun hint (Slurm is installed
    # on this machine), its LitLogger advert or a model summary claiming 0 FLOPs, nor wandb's "anonymous" warning;
    # nor Lightning's `weights_only` notice when the final checkpoint is saved;
    # and after the run's own summary, not wandb's history/summary block (its sync line stays). wandb as a user
    # has it: not silenced as the rest of the suite is (WANDB_SILENT).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"} | {"WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *TINY, *data_overrides, "logger=wandb",
                           "trainer.max_steps=2", "export_hf=false", f"run_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("srun", "litlogger", "anonymous setting", "Total FLOPs", "hp_metric", "Traceback", "Run history:",
                  "Run summary:", "`weights_only` was not set", "have overridden `transfer_batch_to_device`"):
        assert noise not in text, (noise, text[-3000:])
    assert "wandb sync " in text, text[-3000:]
    assert "Model: 0.05M parameters (2 layers x 32, 2 heads" in proc.stdout


@pytest.mark.slow
def test_console_scripts_print_help():
    for script in ("roberta-pl-train", "roberta-pl-finetune", "roberta-pl-data", "roberta-pl-export",
                   "roberta-pl-fill-mask"):
        proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (script, proc.stderr)
        assert len(proc.stdout) > 100, script


def test_progress_bar_counts_optimizer_steps_across_a_resume(tmp_path, data_overrides, capsys):
    """Progress counts optimizer steps out of max_steps (a stream has no fixed epoch) and continues from the resumed
    step. Not on a terminal (pytest's capture), the lines replace the Rich bar: `step k/max_steps`."""
    bar = [o for o in TINY if "progress_bar" not in o] + ["trainer.enable_progress_bar=true"]
    run(compose_cfg([*bar, *data_overrides, "trainer.stop_at_step=4"]), tmp_path)
    first = capsys.readouterr().out
    run(compose_cfg([*bar, *data_overrides]), tmp_path)
    second = capsys.readouterr().out
    assert "step 4/6 (67%)" in first and "Epoch" not in first
    assert "step 6/6 (100%)" in second and "step 4/6" not in second and "Epoch" not in second


def test_a_resume_within_the_same_second_gets_its_own_wandb_folder(tmp_path):
    # W&B names offline folders by the second a run starts: a quick rerun wrote into the previous segment's
    # folder (the full suite caught it: one folder where two were expected).
    import time

    from roberta_pl.loggers import _wait_for_a_new_segment_name

    stamp = time.strftime("%Y%m%d_%H%M%S")
    (tmp_path / f"offline-run-{stamp}-abc123").mkdir()
    _wait_for_a_new_segment_name(tmp_path, "abc123")
    assert time.strftime("%Y%m%d_%H%M%S") != stamp
    _wait_for_a_new_segment_name(tmp_path, "other")  # another run id never waits


def test_a_wsd_stable_phase_checkpoint_decays_on_its_own_in_a_new_run(tmp_path, data_overrides):
    # Warmup-stable-decay: a long run at the peak LR, stopped in its stable phase; the decay is then run alone from
    # that checkpoint, in a run dir of its own, by resuming it with a nearer trainer.max_steps.
    wsd = [*data_overrides, "optim.decay=wsd", "optim.warmup_steps=2", "optim.lr=1e-3", "trainer.val_every_n_steps=100"]
    train(tmp_path / "stable", [*wsd, "trainer.max_steps=100", "trainer.stop_at_step=8"])
    stable = torch.load(tmp_path / "stable" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stable["global_step"] == 8 and stable["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    summary = train(tmp_path / "decay", [*wsd, "trainer.max_steps=12", "optim.decay_steps=4",
                                         f"resume={tmp_path / 'stable' / 'checkpoints' / 'last.ckpt'}"])
    assert summary["global_step"] == 12
    # The loggers number a step's records from 1: record s holds the LR of optimizer step s - 1.
    lrs = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv_rows(tmp_path / "decay") if r.get("lr-AdamW/pg1")}
    assert [lrs[s] for s in (9, 10, 11, 12)] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def csv_rows(run_dir: Path) -> list[dict]:
    import csv

    rows = []
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows
