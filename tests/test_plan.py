"""roberta-pl-plan: the arithmetic users size jobs with."""

import subprocess

import pytest

from roberta_pl.cli.plan import estimate


def test_roberta_base_recipe_on_64_gpus():
    e = estimate("base", 512, 8192, 32, nodes=8, gpus_per_node=8)
    assert (e.accumulation, e.world_size, e.tokens_per_step) == (4, 64, 4_194_304)
    assert e.params / 1e6 == pytest.approx(124.7, abs=0.5)
    assert e.state_gib == pytest.approx(16 * e.params / 2**30)  # DDP: fp32 weights, grads, Adam m and v


def test_zero_stages_shrink_state_and_checkpointing_shrinks_activations():
    kw = dict(model="large", seq_len=512, global_batch=8192, micro_batch=32, nodes=4, gpus_per_node=8)
    states = [estimate(zero_stage=z, **kw).state_gib for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and states[3] < states[0] / 10
    assert estimate(activation_checkpointing=True, **kw).activation_gib < estimate(**kw).activation_gib / 5


def test_time_follows_throughput():
    e = estimate("base", 512, 8192, 32, 8, 8, tokens_per_sec_per_gpu=100_000, steps=1000)
    assert e.step_seconds == pytest.approx(4_194_304 / (100_000 * 64))
    assert e.total_hours == pytest.approx(e.step_seconds * 1000 / 3600)


def test_cli_prints_plan_and_one_line_errors():
    ok = subprocess.run(["roberta-pl-plan", "--model", "base", "--nodes", "8"], capture_output=True, text=True)
    assert ok.returncode == 0 and "accumulation 4 x 64 GPUs" in ok.stdout and "memory per GPU" in ok.stdout
    bad = subprocess.run(["roberta-pl-plan", "--global-batch", "100"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not divisible" in bad.stderr
