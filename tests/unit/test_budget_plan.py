"""Time budgets and the mask-rate schedule: durations, the step count a budget buys, the schedule's rates."""

import re

import pytest
import torch
from data_fixtures import corpus_file, tok, tokenizer_dir  # noqa: F401

from data_pipelines.masking import Masker, MaskingConfig, MaskSchedule, mask_generator
from roberta_pl.batch_plan import (
    BatchPlan,
    StepHorizon,
    budget_max_steps,
    parse_duration,
    robust_seconds,
)
from roberta_pl.optim import lr_lambda


@pytest.mark.parametrize("text, seconds", [("00:00:10:00", 600), ("01:02:03:04", 93784), ("00:10:00", 600),
                                           ("2h", 7200), ("10m", 600), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400),
                                           ("45", 45), (30, 30)])
def test_durations_in_every_accepted_form(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10x", "", "0m", "-5", "1:2", "h"])
def test_a_bad_duration_is_one_line_naming_the_field_and_value(text):
    with pytest.raises(ValueError, match=r"^trainer\.max_time=.*DD:HH:MM:SS") as err:
        parse_duration(text)
    assert "\n" not in str(err.value) and repr(text) in str(err.value)


def plan_of(*phases) -> BatchPlan:
    return BatchPlan(global_batch_size=8, micro_batch_size=1, world_size=1, accumulation=phases[-1][2], seq_len=8,
                     phases=phases)


def test_budget_buys_the_steps_that_fit_and_a_ramp_makes_later_steps_dearer():
    flat = plan_of((0, 0, 2))  # accumulation 2 throughout
    # 10 s left at 0.1 s a micro-batch = 100 micro-batches = 50 more steps after step 10.
    assert budget_max_steps(flat, 10, 10.0, 0.1, cap=10_000) == 60
    assert budget_max_steps(flat, 10, 10.0, 0.1, cap=30) == 30  # never past trainer.max_steps
    assert budget_max_steps(flat, 10, -5.0, 0.1, cap=10_000) == 11  # an exhausted budget still ends on a step
    ramp = plan_of((0, 0, 1), (20, 20, 4))  # 1 micro-batch a step until step 20, then 4
    assert ramp.micro_batches_before(20) == 20 and ramp.micro_batches_before(25) == 40
    step_of = {m: ramp.phase_at_micro_batch(m).step_of(m) for m in (19, 20, 23, 24)}
    assert step_of == {19: 19, 20: 20, 23: 20, 24: 21}
    # From step 10: 10 cheap steps (10 micro-batches), then 90 micro-batches buy 22 steps of 4 (88).
    assert budget_max_steps(ramp, 10, 10.0, 0.1, cap=10_000) == 42


def test_a_budget_decided_at_the_cap_ends_there_not_one_past_it():
    flat = plan_of((0, 0, 2))
    assert budget_max_steps(flat, 30, 100.0, 0.1, cap=30) == 30  # was 31: one step past trainer.max_steps
    assert budget_max_steps(flat, 29, 100.0, 0.1, cap=30) == 30
    assert budget_max_steps(flat, 29, -1.0, 0.1, cap=30) == 30  # one more step, still within the cap


def test_the_rate_a_budget_plans_from_ignores_a_transient_slowdown_and_follows_a_lasting_one():
    steady = [0.1] * 50
    transient = [0.1] * 20 + [1.0] * 10 + [0.1] * 20  # another job on the cores for a fifth of the window
    assert robust_seconds(transient) == pytest.approx(0.1)
    assert sum(transient) / len(transient) > 0.25  # the mean the planner used to take: 2.8x too slow
    lasting = [0.1] * 20 + [0.3] * 30  # slowed 3x for the latter 60%
    assert robust_seconds(lasting) == pytest.approx(0.3)
    assert robust_seconds(steady) == pytest.approx(0.1) and robust_seconds([0.2, 0.4]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no step times"):
        robust_seconds([])


@pytest.mark.parametrize("decay", ["linear", "cosine", "wsd", "polynomial"])
def test_a_replanned_horizon_continues_the_lr_from_where_it_was_to_the_new_last_step(decay):
    warmup, settings = 10, {"decay": decay, "power": 2.0, "decay_fraction": 0.3}
    horizon = StepHorizon(1_000_000, fixed=False)
    seen, every = [], []
    horizon.follow(seen.append)  # follows the first figure only (the mask schedule)
    horizon.follow(every.append, replans=True)  # follows every re-plan (the loop's limit, the LR)
    horizon.set(100)

    def lr(step):
        return lr_lambda(step, warmup_steps=warmup, total_steps=horizon.max_steps,
                         progress=horizon.progress(step, warmup) if step >= warmup else None, **settings)

    before = [lr(s) for s in range(0, 100)]
    assert before == [lr_lambda(s, warmup_steps=warmup, total_steps=100, **settings) for s in range(100)]  # as planned
    horizon.replan(61, 40 + 61)  # at step 60 the budget buys 40 more steps, not 40 + (100 - 61)
    after = [lr(s) for s in range(0, 102)]
    assert after[:61] == before[:61]  # the steps already trained keep their LR
    assert seen == [100] and every == [100, 101] and horizon.history == [(0, 100), (61, 101)]
    assert abs(after[61] - after[60]) <= abs(before[61] - before[60]) * 1.01 + 1e-9  # no jump
    assert after[101] == pytest.approx(lr_lambda(10**6, warmup_steps=warmup, total_steps=100, **settings))  # the end
    horizon.replan(81, 90)  # and shorter again: still monotone (none of these rises after the warm-up)
    final = [lr(s) for s in range(warmup, 91)]
    assert all(b <= a + 1e-12 for a, b in zip(final, final[1:]))
    assert final[-1] == pytest.approx(after[101]) and final[:71] == after[warmup:81]
    early = StepHorizon(1_000_000, fixed=False)
    early.set(100)
    early.replan(6, 50)  # inside the warm-up: no LR changed yet, the decay is the one planned for 50 steps
    assert [early.progress(s, warmup) for s in range(warmup, 51)] == [(s - warmup) / 40 for s in range(warmup, 51)]


def test_steps_after_the_warmup_cost_less_when_the_mask_rate_falls():
    flat = plan_of((0, 0, 1))
    # From step 10: 10 micro-batches at the measured 0.1 s to the warm-up's end (step 20), then the other 9 s buy
    # 180 micro-batches at half the cost.
    assert budget_max_steps(flat, 10, 10.0, 0.1, cap=10_000, cheaper_from=(20, 0.5)) == 200
    assert budget_max_steps(flat, 10, 10.0, 0.1, cap=10_000, cheaper_from=(20, 1.0)) == 110  # as without
    assert budget_max_steps(flat, 30, 10.0, 0.1, cap=10_000, cheaper_from=(20, 0.5)) == 230  # fixed after it
    ramp = plan_of((0, 0, 1), (20, 20, 4))
    assert budget_max_steps(ramp, 10, 10.0, 0.1, cap=10_000, cheaper_from=(20, 0.5)) == 20 + 180 // 4


def test_the_falling_mask_cost_is_the_heads_share_at_the_mean_rate():
    from types import SimpleNamespace

    from roberta_pl.callbacks import falling_mask_cost

    module = SimpleNamespace(flops_per_position=2.0, flops_per_prediction=4.0)
    with_schedule = SimpleNamespace(datamodule=SimpleNamespace(mask_schedule=MaskSchedule(0.3, 0.15, hold=1)))
    # Encoder 2 a position, head 4 a prediction: 2 + 0.3 * 4 while measured, 2 + 0.225 * 4 on average after.
    assert falling_mask_cost(with_schedule, module) == pytest.approx(2.9 / 3.2)
    assert falling_mask_cost(SimpleNamespace(datamodule=SimpleNamespace(mask_schedule=None)), module) is None
    assert falling_mask_cost(SimpleNamespace(datamodule=None), module) is None
    assert falling_mask_cost(with_schedule, SimpleNamespace()) is None  # a module without FLOPs figures


def test_mask_schedule_holds_through_warmup_then_falls_linearly_to_the_end_rate():
    s = MaskSchedule(0.3, 0.15, hold=10, horizon=110)
    assert s.rate(0) == s.rate(9) == 0.3
    assert s.rate(10) == pytest.approx(0.3)
    assert s.rate(60) == pytest.approx(0.225)
    assert s.rate(110) == pytest.approx(0.15) and s.rate(10_000) == pytest.approx(0.15)


def test_an_unfixed_horizon_is_fine_in_the_warmup_and_an_error_past_it_in_the_trainers_process():
    s = MaskSchedule(0.3, 0.15, hold=10)
    assert s.horizon is None and s.rate(9) == 0.3
    with pytest.raises(RuntimeError, match="horizon was not fixed"):
        s.rate(10)
    s.set_horizon(20)
    assert s.horizon == 20 and s.rate(15) == pytest.approx(0.225)


@pytest.mark.parametrize("unit", ["token", "whole_word", "span"])
def test_masker_follows_the_schedule_and_is_a_function_of_the_step(unit, tok):
    config = MaskingConfig(0.15, strategy=unit)
    word_start = tok.word_start_table() if unit != "token" else None
    schedule = MaskSchedule(0.3, 0.15, hold=2, horizon=100)
    scheduled = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, config, word_start, schedule=schedule)
    plain = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, config, word_start)
    ids = torch.randint(5, tok.vocab_size, (64, 128), generator=torch.Generator().manual_seed(0))

    def rate(masker, step):
        return (masker(ids, mask_generator(1, step, 0), step)[1] != -100).float().mean().item()

    assert rate(scheduled, 0) == pytest.approx(0.3, abs=0.03)
    assert rate(scheduled, 100) == pytest.approx(0.15, abs=0.02)
    assert rate(plain, 0) == pytest.approx(0.15, abs=0.02)  # no schedule: mask_prob at every step
    a = scheduled(ids, mask_generator(1, 50, 0), 50)
    b = scheduled(ids, mask_generator(1, 50, 0), 50)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("override, message", [
    ("trainer.max_time=ten", "trainer.max_time='ten': give a positive duration"),
    ("data.mask_prob_start=1.5", "data.mask_prob_start=1.5: a rate in (0, 1)"),
])
def test_preflight_names_a_bad_budget_or_mask_schedule_in_one_line(override, message):
    from hydra import compose, initialize_config_dir

    from roberta_pl.config import CONF_DIR
    from roberta_pl.errors import ConfigError
    from roberta_pl.pretraining.checks import check_budget
    from roberta_pl.pretraining.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[override])
        short_warmup = compose(config_name="pretrain", overrides=["trainer.max_time=10m", "optim.warmup_steps=2"])
        ok = compose(config_name="pretrain", overrides=["experiment=budget_cpu"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_budget(cfg)
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=2: trainer.max_time measures the step rate"):
        check_budget(short_warmup)
    assert check_budget(ok) == 600


class _Rates(torch.utils.data.IterableDataset):
    def __init__(self, schedule):
        self.schedule = schedule

    def __iter__(self):
        return iter([self.schedule.rate(step) for step in range(4)])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_horizon_fixed_after_the_workers_started_reaches_them(context):
    # A budget run's DataLoader workers start before the horizon is known; one that reaches the end of the hold
    # waits for it, and sees the value the trainer's process writes afterwards.
    schedule = MaskSchedule(0.3, 0.15, hold=2, wait_seconds=30)  # unshared memory: an error, not a hang
    loader = torch.utils.data.DataLoader(_Rates(schedule), batch_size=None, num_workers=1, multiprocessing_context=context)
    batches = iter(loader)
    schedule.set_horizon(6)  # the worker is started; it masks steps 2 and 3 only once this is visible to it
    assert [float(r) for r in batches] == pytest.approx([0.3, 0.3, 0.3, 0.2625])


def test_the_step_bar_shows_the_figure_a_budget_fixed_and_replanned_not_the_cap(tmp_path):
    import lightning.pytorch as pl
    from test_lightning_compat import Tiny

    from roberta_pl.callbacks import StepProgressBar
    from roberta_pl.lightning_compat import set_max_steps

    horizon, totals = StepHorizon(1_000_000, fixed=False), {}

    class Budget(pl.Callback):  # what the BudgetPlanner does to the horizon: fix at step 2, re-plan at step 4
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                horizon.set(9)
            elif trainer.global_step == 4:
                horizon.replan(5, 7)

    class Seen(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            totals[trainer.global_step] = bar.progress.tasks[bar.train_progress_bar_id].total

    bar = StepProgressBar()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1_000_000, callbacks=[Budget(), bar, Seen()], logger=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    horizon.follow(lambda steps: set_max_steps(trainer, steps), replans=True)
    trainer.fit(Tiny())
    assert totals == {1: 1_000_000, 2: 9, 3: 9, 4: 7, 5: 7, 6: 7, 7: 7} and trainer.global_step == 7


@pytest.mark.parametrize("replan", [(951, 2000), (951, 990), (700, 2000)])  # in the decay, cut, in the stable phase
def test_wsd_with_a_decay_fraction_continues_without_a_jump_across_a_replan(replan):
    warmup, settings = 100, {"decay": "wsd", "decay_fraction": 0.2}
    horizon = StepHorizon(1000)
    horizon.replan(*replan)

    def lr(step):
        return lr_lambda(step, warmup_steps=warmup, total_steps=horizon.max_steps,
                         progress=horizon.progress(step, warmup), **settings)

    lrs = [lr(s) for s in range(0, horizon.max_steps + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # never back up to the peak
    r = replan[0]  # the step down after the re-plan is no larger than the one before it or after it: no jump
    assert lrs[r] - lrs[r + 1] <= 1.01 * max(lrs[r - 1] - lrs[r], lrs[r + 1] - lrs[r + 2]) + 1e-12
    assert lrs[-1] == 0.0


def test_preflight_refuses_wsd_decay_steps_under_a_time_budget_in_one_line():
    # A decay over the last N steps of a figure that a re-plan moves: the LR went back to the peak (0.5 -> 1.0).
    from hydra import compose, initialize_config_dir

    from roberta_pl.config import CONF_DIR
    from roberta_pl.errors import ConfigError
    from roberta_pl.pretraining.checks import check_budget
    from roberta_pl.pretraining.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        steps = compose(config_name="pretrain", overrides=["experiment=budget_cpu", "optim.decay=wsd",
                                                           "optim.decay_steps=100"])
        fraction = compose(config_name="pretrain", overrides=["experiment=budget_cpu", "optim.decay=wsd",
                                                              "optim.decay_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"^optim.decay_steps=100: trainer.max_time re-plans .*optim.decay_fraction"):
        check_budget(steps)
    assert check_budget(fraction) == 600


def test_progress_lines_time_training_steps_apart_from_validation(tmp_path, capsys):
    # Each training step takes 1 s by the test clock and each validation 10 s: the line after a validation shows
    # 1 s a step, and the time left is the steps left at that rate plus the validations still due at 10 s.
    import lightning.pytorch as pl
    from test_lightning_compat import Tiny
    from torch.utils.data import DataLoader, TensorDataset

    from roberta_pl.callbacks.progress import ProgressLog

    class Validated(Tiny):
        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(batch[0]).pow(2).mean())

        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)  # 2 batches

    now = [0.0]

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args):
            now[0] += 1.0

        def on_validation_batch_end(self, *args):
            now[0] += 5.0

    log = ProgressLog(every_seconds=1e9, val_every_n_steps=4, clock=lambda: now[0])
    trainer = pl.Trainer(accelerator="cpu", max_steps=12, val_check_interval=4, check_val_every_n_epoch=None,
                         callbacks=[Clock(), log], logger=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(Validated())
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert [re.sub(r"train/loss [\d.]+ \| val/loss [\d.]+ \| ", "", x) for x in lines] == [
        "step 4/12 (33%) | 1000.0 ms/step | 0:00:14 elapsed, 0:00:28 left",  # 8 steps + 2 validations
        "step 8/12 (67%) | 1000.0 ms/step | 0:00:28 elapsed, 0:00:14 left",
        "step 12/12 (100%) | 1000.0 ms/step | 0:00:42 elapsed, 0:00:00 left"]
