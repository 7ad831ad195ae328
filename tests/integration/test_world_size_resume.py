"""Resume on another world size (after losing a node, or gaining one), with real processes on CPU ranks (gloo).

One run per strategy (DDP, ZeRO-2, ZeRO-3) goes 2 ranks -> 1 rank -> 2 ranks: `roberta-pl-train` on 2 ranks stops at
step 4, the same command on 1 rank resumes it and stops at step 8, and on 2 ranks again it finishes at step 12; a
bf16-mixed ZeRO-2 run goes 2 ranks -> 1 rank to the end. Each resume saves a checkpoint before its first step
(tests/helpers/world_size_probe.py), written by the new ranks: parameters, Adam moments and step count must equal what
the old ranks saved, bit for bit, and the LR schedule must continue. Every rank records the blocks it trains on
(tests/helpers/seen_blocks.py): 8 per step, none twice over the segments. The stream's re-dealing itself is proven
in tests/unit/test_data_stream.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from roberta_pl.optim import lr_lambda
from roberta_pl.strategies import to_universal, zero_checkpoint_ranks

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
BIN = Path(sys.executable).parent
LR, WARMUP, STEPS = 3e-3, 2, 12
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_seq_len=64", "batch.seq_len=64", "batch.global_batch_size=8", "batch.micro_batch_size=2",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "fill_mask=[]", "logger=csv", "export_hf=false",
        f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=4", "checkpoint.keep=5", "trainer.val_every_n_steps=100",
        f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}"]



def test_the_deepspeed_points_the_resume_relies_on_are_where_it_expects():
    """ZeroStrategy.load_checkpoint (roberta_pl/strategies.py) switches DeepSpeed 0.19.8's engine to its universal
    checkpoint for one load, and Lightning 2.6.6's load is the engine's; fail here, by name, if they move."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert "return self._config.load_universal_checkpoint" in inspect.getsource(DeepSpeedEngine.load_universal_checkpoint)
    assert "self.deepspeed_engine.load_checkpoint(" in inspect.getsource(DeepSpeedStrategy.load_checkpoint)
    assert "deepspeed_engine.save_checkpoint(" in inspect.getsource(DeepSpeedStrategy.save_checkpoint)
    # roberta_pl.strategies._unshare_adam_steps works around this (one step tensor for every sub-group); when a
    # DeepSpeed release stops sharing it, the workaround can go.
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert "self.optimizer.state[fp32_param]['step'] = state_step" in inspect.getsource(
        DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)


def _train(run_dir: Path, trainer: str, devices: int, data: list[str], *extra: str) -> str:
    """`roberta-pl-train` as a user runs it (Lightning starts rank 1 by re-running the command); its output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    overrides = {o.split("=", 1)[0] for o in extra}  # a precision in `extra` replaces TINY's
    tiny = [o for o in TINY if o.split("=", 1)[0] not in overrides]
    proc = subprocess.run(["roberta-pl-train", f"trainer={trainer}", *tiny, f"trainer.devices={devices}",
                           f"run_dir={run_dir}", *data, *extra], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _two_one_two(run_dir: Path, trainer: str, shard_dir: Path, tokenizer_dir: Path, *extra: str,
                 back_to_two: bool = True) -> str:
    """2 ranks to step 4, 1 rank to step 8, 2 ranks to step 12; each resume saves `at-<step>.ckpt` first. Every
    rank of every segment records the blocks it trains on in ``run_dir/blocks`` (seen_blocks.RecordBlocks). With
    ``back_to_two=False``, 2 ranks to step 4 and 1 rank to step 12."""
    data = [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    record = "{_target_:seen_blocks.RecordBlocks,folder:'%s'}" % (run_dir / "blocks")
    probe = "trainer.callbacks=[%s,{_target_:world_size_probe.SaveAtResume,path:'%s'}]"
    logs = _train(run_dir, trainer, 2, data, "trainer.stop_at_step=4", f"trainer.callbacks=[{record}]", *extra)
    if not back_to_two:
        return logs + _train(run_dir, trainer, 1, data, probe % (record, run_dir / "at-4.ckpt"), *extra)
    logs += _train(run_dir, trainer, 1, data, "trainer.stop_at_step=8", probe % (record, run_dir / "at-4.ckpt"), *extra)
    logs += _train(run_dir, trainer, 2, data, probe % (record, run_dir / "at-8.ckpt"), *extra)
    return logs


def _assert_training_continued(run_dir: Path, logs: str, resumes: int = 2) -> None:
    """Steps 1-12 logged once each, the loss finite and falling from one segment of 4 steps to the next; the
    data stream re-planned at each resume (the INFO line); every step trained on a global batch of 8 blocks, and
    no block twice across the segments (what seen_blocks.RecordBlocks wrote, over all ranks of all runs)."""
    history = json.loads((run_dir / "metrics_history.json").read_text())
    loss = {h["step"]: h["train_loss"] for h in history if "train_loss" in h}
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in loss.values()), loss
    means = [sum(loss[s] for s in range(k, k + 4)) / 4 for k in (1, 5, 9)]
    assert means[0] > means[1] > means[2], loss
    assert logs.count("data: re-planned for this run") == resumes, logs[-3000:]
    seen = [line.split() for f in sorted((run_dir / "blocks").iterdir()) for line in f.read_text().splitlines()]
    assert Counter(int(step) for step, _ in seen) == {step: 8 for step in range(STEPS)}
    assert len({block for _, block in seen}) == len(seen) == 8 * STEPS, "a block was trained on twice"
    assert "the checkpoint's plan was 2 rank(s) x 1 reader(s), micro-batch 2, accumulation 2; now 1 x 1" in logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == STEPS


def _universal_state(ckpt: Path) -> dict[tuple[str, str], torch.Tensor]:
    """Per parameter: fp32 weights, Adam's exp_avg and exp_avg_sq, and step, however many ranks wrote ``ckpt``.

    ZeRO-1/2 conversions keep a step per parameter; a ZeRO-3 conversion keeps Adam's step once, in
    ``zero/optimizer_state.pt``, and DeepSpeed 0.19.8's stage-3 load gives every parameter the first sub-group's
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``): that one is each parameter's step here."""
    out = to_universal(ckpt, 0, 0, lambda *_: None)
    state = {}
    for folder in (out / "zero").iterdir():
        for f in folder.glob("*.pt"):
            value = torch.load(f, map_location="cpu", weights_only=True)
            state[(folder.name, f.stem)] = value["param"] if isinstance(value, dict) else value
    if not any(kind == "step" for _, kind in state):
        # DeepSpeed's own output from files vetted by to_universal (it pickles its config objects beside the state)
        optimizer = torch.load(out / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        step = torch.as_tensor(optimizer["optimizer_state_dict"]["state"][0]["step"])
        state.update({(name, "step"): step for name, _ in list(state)})
    shutil.rmtree(out.parent)
    return state


@pytest.mark.slow
def test_zero2_checkpoint_resumes_on_one_rank_and_back_on_two(tmp_path, shard_dir, tokenizer_dir):
    from roberta_pl.checks import read_checkpoint

    run = tmp_path / "run"
    logs = _two_one_two(run, "deepspeed_zero2", shard_dir, tokenizer_dir)
    assert logs.count("converted it to DeepSpeed's universal checkpoint") == 2, logs[-3000:]
    for step, ranks in ((4, (2, 1)), (8, (1, 2))):
        saved, resumed = run / "checkpoints" / f"step-{step:07d}.ckpt", run / f"at-{step}.ckpt"
        assert (zero_checkpoint_ranks(saved), zero_checkpoint_ranks(resumed)) == ranks
        a, b = _universal_state(saved), _universal_state(resumed)
        assert {k[1] for k in a} == {"fp32", "exp_avg", "exp_avg_sq", "step"} and a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]), key  # bit for bit, re-partitioned for the new ranks
        assert float(a[("model.lm_head.bias", "step")]) == step
        sa, sb = read_checkpoint(saved), read_checkpoint(resumed)
        assert sa["global_step"] == sb["global_step"] == step and sa["lr_schedulers"] == sb["lr_schedulers"]
    final = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS and final["lr_schedulers"][0]["last_epoch"] == STEPS
    assert final["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(LR * lr_lambda(STEPS, warmup_steps=WARMUP,
                                                                                     total_steps=STEPS))
    # A save over a checkpoint of more ranks leaves no partition of theirs behind.
    assert sorted(p.name for p in (run / "checkpoints" / "step-0000008.ckpt" / "checkpoint").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    _assert_training_continued(run, logs)


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_one_rank_and_back_on_two(tmp_path, shard_dir, tokenizer_dir):
    run = tmp_path / "run"
    logs = _two_one_two(run, "ddp", shard_dir, tokenizer_dir)
    for step in (4, 8):
        a = torch.load(run / "checkpoints" / f"step-{step:07d}.ckpt", map_location="cpu", weights_only=True)
        b = torch.load(run / f"at-{step}.ckpt", map_location="cpu", weights_only=True)
        assert a["global_step"] == b["global_step"] == step and a["lr_schedulers"] == b["lr_schedulers"]
        assert a["MLMDataModule"]["world_size"] != b["MLMDataModule"]["world_size"]
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), k
        sa, sb = a["optimizer_states"][0], b["optimizer_states"][0]
        assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
        for i, moments in sa["state"].items():
            assert {"exp_avg", "exp_avg_sq", "step"} <= moments.keys()
            assert all(torch.equal(v, sb["state"][i][k]) for k, v in moments.items()), i
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == STEPS and final["lr_schedulers"][0]["last_epoch"] == STEPS
    _assert_training_continued(run, logs)


def _assert_zero_state_carried(run: Path, resumes: dict[int, tuple[int, int]]) -> None:
    """For each resume ``{step: (ranks that saved, ranks that resumed)}``: the checkpoint the new ranks saved before
    their first step (``at-<step>.ckpt``) holds what the old ranks saved at that step: the consolidated fp32
    parameters (roberta_pl.checkpoints.load_pretrained, as export reads them) and, per parameter, Adam's moments and
    step (the universal conversion of each), bit for bit; the same global step and LR schedule. The run's last
    checkpoint is at step 12 with the schedule's last value."""
    from roberta_pl.checkpoints import load_pretrained
    from roberta_pl.checks import read_checkpoint

    for step, ranks in resumes.items():
        saved, resumed = run / "checkpoints" / f"step-{step:07d}.ckpt", run / f"at-{step}.ckpt"
        assert (zero_checkpoint_ranks(saved), zero_checkpoint_ranks(resumed)) == ranks
        params_saved, params_resumed = (load_pretrained(p)[0].state_dict() for p in (saved, resumed))
        assert params_saved.keys() == params_resumed.keys()
        for name, value in params_saved.items():
            assert value.dtype == torch.float32 and torch.equal(value, params_resumed[name]), name
        a, b = _universal_state(saved), _universal_state(resumed)
        assert {k[1] for k in a} == {"fp32", "exp_avg", "exp_avg_sq", "step"} and a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]), key  # bit for bit, re-partitioned for the new ranks
        assert {float(v) for k, v in a.items() if k[1] == "step"} == {step}  # Adam's step count continues
        sa, sb = read_checkpoint(saved), read_checkpoint(resumed)
        assert sa["global_step"] == sb["global_step"] == step and sa["lr_schedulers"] == sb["lr_schedulers"]
    final = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS and final["lr_schedulers"][0]["last_epoch"] == STEPS
    assert final["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(LR * lr_lambda(STEPS, warmup_steps=WARMUP,
                                                                                     total_steps=STEPS))


@pytest.mark.slow
def test_zero3_checkpoint_resumes_on_one_rank_and_back_on_two(tmp_path, shard_dir, tokenizer_dir, reliability):
    """ZeRO-3 (fp32): parameters are partitioned as well as the optimizer state, so the new ranks' parameters
    come from the conversion too. Adam's step at step 8 is 8: DeepSpeed's stage-3 universal load shared one step
    tensor between the two parameter groups, and the 1-rank run saved 12 (roberta_pl.strategies._unshare_adam_steps)."""
    run = tmp_path / "run"
    logs = _two_one_two(run, "deepspeed_zero3", shard_dir, tokenizer_dir)
    assert logs.count("converted it to DeepSpeed's universal checkpoint") == 2, logs[-3000:]
    _assert_zero_state_carried(run, {4: (2, 1), 8: (1, 2)})
    _assert_training_continued(run, logs)
    reliability("world_size_zero3",
                happened="resumed twice on another number of ranks (2 -> 1 at step 4, 1 -> 2 at step 8), each time "
                         "through DeepSpeed's universal checkpoint; the run finished at step 12, each of its 96 blocks "
                         "trained on once",
                kept="the consolidated fp32 parameters, Adam's moments and step (continuing: 8 at step 8) and the LR "
                     "schedule, bit for bit as the old ranks saved them")


@pytest.mark.slow
def test_bf16_zero2_checkpoint_resumes_on_one_rank(tmp_path, shard_dir, tokenizer_dir):
    """bf16-mixed ZeRO-2 (the optimizer files are `bf16_zero_pp_rank_*`; the fp32 master weights live in them),
    2 ranks to step 4, then 1 rank to the end."""
    run = tmp_path / "run"
    logs = _two_one_two(run, "deepspeed_zero2", shard_dir, tokenizer_dir, "trainer.precision=bf16-mixed",
                        back_to_two=False)
    assert logs.count("converted it to DeepSpeed's universal checkpoint") == 1, logs[-3000:]
    from roberta_pl.checkpoints import zero_tag_dir

    assert sorted(p.name for p in zero_tag_dir(run / "checkpoints" / "step-0000004.ckpt").glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    _assert_zero_state_carried(run, {4: (2, 1)})
    _assert_training_continued(run, logs, resumes=1)
