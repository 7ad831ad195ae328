"""Time-budgeted pretraining (trainer.max_time) through the real entry point: the step count is fixed from the
measured rate and saved; a stopped and resumed budget run is the step-count run of that many steps, bit for bit."""

import csv
import json

import pytest
import torch
from data_fixtures import one_thread  # noqa: F401
from test_pretrain import TINY, compose_cfg

from roberta_pl.callbacks import fixed_max_steps
from roberta_pl.optim import lr_lambda
from roberta_pl.pretraining.app import run

pytestmark = pytest.mark.usefixtures("one_thread")  # a budget is spent on training, not on thread contention

BUDGET = ["optim.warmup_steps=20", "data.mask_prob_start=0.3", "checkpoint.every_n_steps=5",
          "trainer.log_every_n_steps=1"]


@pytest.fixture
def data(shard_dir, tokenizer_dir):
    return [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]


def _lrs(run_dir):
    """The learning rate logged at each optimizer step (log_every_n_steps=1), over every job of the run."""
    rows = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            lr = next((v for k, v in row.items() if k.startswith("lr") and v), None)
            if lr is not None:
                rows[int(row["step"])] = float(lr)
    return rows


def test_a_budget_run_ends_at_the_step_it_fixed_with_validation_checkpoint_and_export(tmp_path, data, capsys):
    budget = [*TINY, *data, *BUDGET, "trainer.max_time=00:00:00:04", "trainer.max_steps=100000",
              "trainer.val_every_n_steps=1000"]
    run(compose_cfg([*budget, "trainer.stop_at_step=11"]), tmp_path)  # the figure is fixed at step 10
    fixed = fixed_max_steps(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True))
    assert fixed is not None and 10 < fixed < 100000  # from the time left, not the cap
    out = capsys.readouterr().out
    assert "trainer.max_steps fixed at" in out and "x that after the warm-up, at the mask schedule's mean rate" in out
    summary = run(compose_cfg(budget), tmp_path)  # resumed: to the saved figure, whatever time is left
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert summary["global_step"] == ckpt["global_step"] == fixed_max_steps(ckpt) == fixed
    assert ckpt["hyper_parameters"]["max_steps"] == fixed  # what the LR schedule decays to
    # Warm-up over 20 steps, then linear decay to 0 at the fixed step, across the stop and the resume.
    peak = compose_cfg(budget).optim.lr
    lrs = _lrs(tmp_path)
    assert sorted(lrs) == list(range(1, fixed + 1))
    for step, lr in lrs.items():  # the row of step s holds the LR step s trained with
        assert lr == pytest.approx(peak * lr_lambda(step - 1, warmup_steps=20, total_steps=fixed), rel=1e-6), step
    history = json.loads((tmp_path / "metrics_history.json").read_text())
    assert [h["step"] for h in history if "val_loss" in h][-1] == fixed  # the last step validates
    assert (tmp_path / "hf" / "model.safetensors").exists()
    capsys.readouterr()
    again = run(compose_cfg(budget), tmp_path)  # finished: the fixed figure, not the cap, says so
    out = capsys.readouterr().out
    assert again["global_step"] == fixed and "already finished" in out and "the steps its budget bought" in out
    assert "Raise trainer.max_steps" not in out  # the cap is not what stopped it; raising it changes nothing


def test_a_stopped_budget_run_resumes_to_its_fixed_step_as_the_step_run_of_that_many_steps(tmp_path, data):
    # The budget is ample, so trainer.max_steps (the cap) is what the planner fixes: the figure is known in advance
    # and the comparison run can be started before it. The planner still measures and fixes it at step 10.
    budget = [*TINY, *data, *BUDGET, "trainer.max_time=10m", "trainer.max_steps=30", "trainer.val_every_n_steps=12"]
    stopped = tmp_path / "budget"
    run(compose_cfg([*budget, "trainer.stop_at_step=15"]), stopped)
    first = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 15 and fixed_max_steps(first) == 30
    run(compose_cfg(budget), stopped)  # resumed: the saved figure, no new measurement
    end = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert end["global_step"] == fixed_max_steps(end) == 30

    steps = tmp_path / "steps"  # counted in steps from the start, never interrupted
    run(compose_cfg([*TINY, *data, *BUDGET, "trainer.max_steps=30", "trainer.val_every_n_steps=12"]), steps)
    straight = torch.load(steps / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, end["state_dict"][k]), k  # bit for bit on CPU: same LR, masks and data at every step
    assert _lrs(steps) == _lrs(stopped) and len(_lrs(steps)) == 30


@pytest.mark.slow
def test_two_ranks_with_skewed_clocks_fix_the_same_step_count(tmp_path, data, reliability):
    """Rank 1's clock runs 200x fast, so by its own clock 5% of the budget went into measuring at once, while
    rank 0's says not yet. Were each rank to decide alone, rank 1's broadcast of the figure would meet rank 0's
    gradient all-reduce: a hang or garbage. The ranks agree on the step, so both fix the figure at the same step,
    stop at the same step, and the job ends."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    helpers = Path(__file__).resolve().parents[1] / "helpers"
    args = [*TINY, *data, *BUDGET, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "trainer.max_time=10m", "trainer.max_steps=14", "trainer.val_every_n_steps=1000",
            "export_hf=false", "logger=csv", "checkpoint.every_n_steps=1000", f"run_dir={tmp_path}",
            "trainer.callbacks=[{_target_:reliability_faults.ClockSkew,rank:1,factor:200}]"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(helpers), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *args], capture_output=True, text=True,
                          timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if "trainer.max_steps fixed at" in x)
    fixed_at = int(line.split("over steps ")[1].split("-")[1].split(" ")[0].rstrip(","))
    assert fixed_at < 10  # rank 1's skewed clock made every rank fix it early, at the same step (fix_step is 10)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == fixed_max_steps(last) == 14  # ample budget on rank 0: the cap, broadcast from it
    reliability("budget_clock_skew",
                happened=f"rank 1 of 2 (DDP, gloo) with a clock running 200x fast wanted to fix max_steps at once; the "
                         f"ranks agreed (one boolean all-reduce a step in the measuring window) and both fixed it at "
                         f"step {fixed_at}, rank 0's figure broadcast; the job finished",
                kept="both ranks at the same step count (the cap, 14), no hang")
