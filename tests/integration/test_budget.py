"""Time-budgeted pretraining (trainer.max_time) through the real entry point: the step count is fixed from the
measured rate, re-planned when the rate changes, and every decision saved; a stopped and resumed budget run is the
uninterrupted one, bit for bit (with a fixed figure, the step-count run of that many steps).

Load is simulated without timing anything: :class:`StepClock` drives the planner's clock by the step number, so
"step 11 on takes 3x as long" is exact, and the planner's decisions are a function of the step in every job."""

import csv
import json
import os
import re
import signal
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from data_fixtures import one_thread  # noqa: F401
from test_pretrain import TINY, compose_cfg

from roberta_pl.batch_plan import StepHorizon
from roberta_pl.callbacks import BudgetPlanner, fixed_max_steps
from roberta_pl.optim import lr_lambda
from roberta_pl.pretraining.app import run

pytestmark = pytest.mark.usefixtures("one_thread")  # a budget is spent on training, not on thread contention

BUDGET = ["optim.warmup_steps=20", "data.mask_prob_start=0.3", "checkpoint.every_n_steps=5",
          "trainer.log_every_n_steps=1"]


@pytest.fixture
def data(shard_dir, tokenizer_dir):
    return [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]


class StepClock(pl.Callback):
    """The :class:`BudgetPlanner`'s clock, driven by the step: each optimizer step costs ``seconds`` of budget,
    ``factor`` times that for steps ``slow_from .. slow_until`` (validation costs nothing). Each job counts from the
    step it resumed at (its planner adds the time the checkpoint says was spent), as a real clock would."""

    def __init__(self, seconds: float, factor: float = 1.0, slow_from: int = 10**9, slow_until: int = 10**9) -> None:
        self.seconds, self.factor, self.slow_from, self.slow_until = seconds, factor, slow_from, slow_until
        self.trainer: pl.Trainer | None = None
        self.start: int | None = None

    def at(self, step: int) -> float:
        """Budget seconds steps 1 .. ``step`` take."""
        slow = max(0, min(step, self.slow_until) - self.slow_from + 1)
        return self.seconds * (step + (self.factor - 1) * slow)

    def now(self) -> float:
        return 0.0 if self.start is None else self.at(self.trainer.global_step) - self.at(self.start)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        next(c for c in trainer.callbacks if isinstance(c, BudgetPlanner)).use_clock(self.now)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = trainer.global_step


class SignalAt(pl.Callback):
    """Sends this process SIGUSR1 in the batch that completes optimizer step ``step`` (as Slurm's warning would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def clock(signal_at: int | None = None, **kwargs) -> str:
    """The trainer.callbacks override: a :class:`StepClock` of ``kwargs`` (and a :class:`SignalAt`)."""
    callbacks = ["{_target_:test_budget.StepClock," + ",".join(f"{k}:{v}" for k, v in kwargs.items()) + "}"]
    if signal_at is not None:
        callbacks.append(f"{{_target_:test_budget.SignalAt,step:{signal_at}}}")
    return f"trainer.callbacks=[{','.join(callbacks)}]"


def train(overrides, run_dir) -> dict:
    """A run with the overrides on its command line (a test clock's _target_ is named there)."""
    return run(compose_cfg(overrides), run_dir, overrides=list(overrides))


def decisions(run_dir) -> list[dict]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["callbacks"][BudgetPlanner.__qualname__]["decisions"]


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
    summary = run(compose_cfg(budget), tmp_path)  # resumed: the saved figure, then re-planned on this job's clock
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    last = fixed_max_steps(ckpt)
    assert summary["global_step"] == ckpt["global_step"] == last
    made = decisions(tmp_path)
    assert made[0]["max_steps"] == fixed and made[-1]["max_steps"] == last and made[0]["at_step"] <= 10
    assert ckpt["hyper_parameters"]["max_steps"] == last  # what the LR schedule decays to
    # Warm-up over 20 steps, then linear decay to 0 at the last figure, continued at each re-plan, across the stop
    # and the resume.
    horizon = StepHorizon(100000, fixed=False)
    horizon.set(made[0]["max_steps"])
    for decision in made[1:]:
        horizon.replan(decision["from_step"], decision["max_steps"])
    peak = compose_cfg(budget).optim.lr
    lrs = _lrs(tmp_path)
    assert sorted(lrs) == list(range(1, last + 1))
    for step, lr in lrs.items():  # the row of step s holds the LR step s trained with
        s = step - 1
        expected = lr_lambda(s, warmup_steps=20, total_steps=last, progress=horizon.progress(s, 20) if s >= 20 else None)
        assert lr == pytest.approx(peak * expected, rel=1e-6, abs=1e-12), step
    history = json.loads((tmp_path / "metrics_history.json").read_text())
    assert [h["step"] for h in history if "val_loss" in h][-1] == last  # the last step validates
    assert (tmp_path / "hf" / "model.safetensors").exists()
    capsys.readouterr()
    again = run(compose_cfg(budget), tmp_path)  # finished: the fixed figure, not the cap, says so
    out = capsys.readouterr().out
    assert again["global_step"] == last and "already finished" in out and "the steps its budget bought" in out
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


LOAD = [*TINY, *BUDGET, "trainer.max_steps=100000", "trainer.val_every_n_steps=1000", "export_hf=false"]


def _spent(run_dir, clock_kwargs) -> tuple[int, float]:
    """The run's last step and the budget seconds its steps took by the test clock."""
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    return step, StepClock(**clock_kwargs).at(step)


def test_a_run_that_slows_down_3x_after_the_plan_replans_to_a_figure_that_fits_the_budget(tmp_path, data, capsys):
    # 1 s a step until step 10, by which the figure is fixed for a 100-s budget (about 100 steps; at step 7, where
    # 5% of the budget went into measuring); 3 s a step from step 11 on.
    slow = {"seconds": 1.0, "factor": 3.0, "slow_from": 11}
    train([*LOAD, *data, "trainer.max_time=100", clock(**slow)], tmp_path)
    made = decisions(tmp_path)
    first, last = made[0]["max_steps"], made[-1]["max_steps"]
    assert made[0]["at_step"] <= 10 and first > 90  # planned at 1 s a step
    assert StepClock(**slow).at(first) > 250  # kept, it would have taken 2.7x the budget
    assert len(made) >= 2 and last < 45 and made[1]["seconds_per_micro_batch"] == pytest.approx(1.5)  # 3 s / 2
    step, spent = _spent(tmp_path, slow)
    assert step == last and 90 <= spent <= 110, (made, spent)  # within 10% of the budget
    assert "re-planned at step" in capsys.readouterr().out
    decays_the_steps_left(made, _lrs(tmp_path))


def decays_the_steps_left(made: list[dict], lrs: dict[int, float], warmup: int = 20) -> None:
    """After a re-plan at step r to M steps, the steps still to train (0-based r .. M - 1) share the rest of the
    linear decay: from the LR the last step trained with down to 0 at M, the next step included (its LR was set
    before the re-plan: a late cut to a few steps would leave them far above the end LR)."""
    for decision, after in zip(made[1:], [*made[2:], None]):
        r, m = decision["at_step"], decision["max_steps"]
        if r - 1 < warmup:
            continue
        last = lrs[r]  # the row of step s holds the LR 0-based step s - 1 trained with
        for s in range(r, m if after is None else min(m, after["at_step"])):
            assert lrs[s + 1] == pytest.approx(last * (m - s) / (m - r + 1), rel=1e-6), (s, decision)


def test_a_transient_slowdown_while_measuring_is_corrected_by_a_later_replan(tmp_path, data):
    # Another job on the cores while the planner measures: 4 s a step until step 10, then 1 s. The first figure
    # (about 37 steps of 4 s) would end the run at 45% of its 150-s budget.
    transient = {"seconds": 1.0, "factor": 4.0, "slow_from": 1, "slow_until": 10}
    train([*LOAD, *data, "trainer.max_time=150", clock(**transient)], tmp_path)
    made = decisions(tmp_path)
    assert StepClock(**transient).at(made[0]["max_steps"]) < 0.5 * 150
    step, spent = _spent(tmp_path, transient)
    assert step == made[-1]["max_steps"] > 2.5 * made[0]["max_steps"] and 135 <= spent <= 165, (made, spent)


def test_a_run_stopped_right_after_a_replan_and_right_after_a_resume_is_the_uninterrupted_run_bit_for_bit(tmp_path,
                                                                                                      data):
    slow = {"seconds": 1.0, "factor": 3.0, "slow_from": 11}
    budget = [*LOAD, *data, "trainer.max_time=100", "checkpoint.every_n_steps=1", clock(**slow)]
    straight = tmp_path / "straight"
    train(budget, straight)
    made = decisions(straight)
    replan = made[1]["at_step"]  # the first re-plan
    assert len(made) >= 3
    stopped = tmp_path / "stopped"
    train([*budget, f"trainer.stop_at_step={replan}"], stopped)  # right after the re-plan
    assert [d["max_steps"] for d in decisions(stopped)] == [d["max_steps"] for d in made[:2]]
    train([*budget, f"trainer.stop_at_step={replan + 1}"], stopped)  # right after the resume
    train(budget, stopped)
    key = ("at_step", "from_step", "max_steps", "seconds_per_micro_batch", "seconds_left")
    assert [[d[k] for k in key] for d in decisions(stopped)] == [[d[k] for k in key] for d in made]
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == made[-1]["max_steps"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # same LR, masks and data at every step
    assert _lrs(straight) == _lrs(stopped)


def test_resumes_just_before_a_replan_point_and_after_a_deferred_replan_keep_replanning(tmp_path, data):
    # 1 s a step, 3x slower from step 30, a 100-s budget. A job resumed one step before a re-plan point has too few
    # steps timed there, so it defers the re-plan; the job after it resumes past the deferred point. Re-planning
    # stopped for the rest of the run in both cases (239 s of a 100-s budget).
    slow = {"seconds": 1.0, "factor": 3.0, "slow_from": 30}
    budget = [*LOAD, *data, "trainer.max_time=100", "checkpoint.every_n_steps=1", clock(**slow)]
    straight = tmp_path / "straight"
    train(budget, straight)
    replan = decisions(straight)[2]["at_step"]  # the re-plan that first sees the slowdown
    stopped = tmp_path / "stopped"
    train([*budget, f"trainer.stop_at_step={replan - 1}"], stopped)
    train([*budget, f"trainer.stop_at_step={replan + 1}"], stopped)  # resumed at replan - 1: deferred
    assert [d["at_step"] for d in decisions(stopped)] == [d["at_step"] for d in decisions(straight)[:2]]
    train(budget, stopped)
    made = decisions(stopped)
    assert made[-1]["at_step"] > replan + 1 and made[-1]["max_steps"] < made[1]["max_steps"], made
    step, spent = _spent(stopped, slow)
    # the resumed job plans once it has timed 3 steps, 5 slow steps after the point (15 s): the uninterrupted run
    # spent 98 s (its re-plan came when 92 s were gone)
    assert step == made[-1]["max_steps"] and 90 <= spent <= 115, (made, spent)


def test_a_signal_on_a_replan_step_saves_its_decision_and_resumes_as_the_uninterrupted_run(tmp_path, data):
    slow = {"seconds": 1.0, "factor": 3.0, "slow_from": 30}
    budget = [*LOAD, *data, "trainer.max_time=100", "checkpoint.every_n_steps=7"]
    straight = tmp_path / "straight"
    train([*budget, clock(**slow)], straight)
    made = decisions(straight)
    replan = made[2]["at_step"]
    signalled = tmp_path / "signalled"
    train([*budget, clock(signal_at=replan, **slow)], signalled)  # SIGUSR1: last.ckpt at the re-plan step
    ckpt = torch.load(signalled / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == replan and decisions(signalled) == made[:3]  # the step's decision saved with it
    train([*budget, clock(**slow)], signalled)
    key = ("at_step", "from_step", "max_steps", "seconds_per_micro_batch", "seconds_left")
    assert [[d[k] for k in key] for d in decisions(signalled)] == [[d[k] for k in key] for d in made]
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(signalled / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == made[-1]["max_steps"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert _lrs(straight) == _lrs(signalled)


def test_a_checkpoint_from_before_replanning_keeps_its_one_figure(tmp_path, data):
    # Such a checkpoint saved the budget time spent before the figure was fixed (next to nothing), not by the
    # checkpoint: re-planning from it would plan for nearly the whole budget again.
    budget = [*LOAD, *data, "trainer.max_time=100", clock(seconds=1.0)]
    train([*budget, "trainer.stop_at_step=15"], tmp_path)
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    first = ckpt["callbacks"][BudgetPlanner.__qualname__]["decisions"][0]
    ckpt["callbacks"][BudgetPlanner.__qualname__] = {  # the state_dict of then
        "max_steps": first["max_steps"], "seconds": 100.0, "spent": 0.5,
        "measured": {"fixed_at_step": first["at_step"], "seconds_per_micro_batch": first["seconds_per_micro_batch"]}}
    torch.save(ckpt, path)
    train(budget, tmp_path)
    end = torch.load(path, weights_only=True)
    assert end["global_step"] == first["max_steps"] and len(decisions(tmp_path)) == 1


def progress_lines(stdout: str) -> list[tuple[int, int]]:
    """(step, total) of each progress line after the budget fixed its figure; each total is checked against the
    figure fixed or re-planned last before it."""
    lines = stdout.splitlines()
    assert "/100,000" not in stdout  # before the figure is fixed the lines show no total: the cap is not one
    fixed = next(i for i, x in enumerate(lines) if "trainer.max_steps fixed at" in x)
    figure = int(re.search(r"fixed at ([\d,]+)", lines[fixed])[1].replace(",", ""))
    shown = []
    for line in lines[fixed + 1:]:
        if replanned := re.search(r"-> trainer.max_steps [\d,]+ -> ([\d,]+)", line):
            figure = int(replanned[1].replace(",", ""))
        elif progress := re.fullmatch(r"step ([\d,]+)/([\d,]+) \(\d+%\) \| train/loss [\d.]+ \| val/loss [\d.]+ \| "
                                      r"val/accuracy [\d.]+ \| [\d.]+ ms/step \| [\d:]+ elapsed, [\d:]+ left", line):
            shown.append((int(progress[1].replace(",", "")), int(progress[2].replace(",", ""))))
            assert shown[-1][1] == figure, line  # the fixed (or re-planned) total, never the 100,000 cap
    return shown


PIPED = [*TINY, *BUDGET, "trainer.max_time=4", "trainer.max_steps=100000", "trainer.val_every_n_steps=8",
         "trainer.enable_progress_bar=true", "export_hf=false"]


@pytest.mark.slow  # ~5-15 s: the full suite runs it, make test-fast does not
def test_a_budget_run_without_a_terminal_logs_progress_lines_with_the_fixed_total(tmp_path, data, capsys):
    train([*PIPED, *data], tmp_path)  # pytest's captured stdout is not a terminal, as a pipe
    shown = progress_lines(capsys.readouterr().out)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert len(shown) >= 2 and shown[-1] == (last, last), shown  # one after each validation, the last at the end


@pytest.mark.slow
def test_a_piped_budget_run_logs_progress_lines_with_the_fixed_total(tmp_path, data):
    done = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *PIPED, *data, f"run_dir={tmp_path}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    shown = progress_lines(done.stdout)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert len(shown) >= 2 and shown[-1] == (last, last), (shown, done.stdout[-2000:])


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
