"""Continued pretraining (``roberta-pl-train pretrained=DIR``) on 2 CPU ranks (gloo), with real processes: DDP and
DeepSpeed ZeRO-2, from HF masked LMs built here with no download (tests/helpers/hf_models.py). On both ranks the
weights before the first update are DIR's (each rank's step-0 loss is ``transformers``' on that rank's batch); the run
trains, a stop at step 3 then ``resume=auto`` ends where an uninterrupted run does, and the export is of DIR's model
type with its tokenizer files. A 2-rank continued checkpoint also resumes on 1 rank and trains to the end.

Each ``roberta-pl-train`` runs as a user runs it: Lightning starts rank 1 by re-running the command. Each rank writes
its own first batch: the callback's path interpolates ``LOCAL_RANK``, which Lightning sets for the rank it starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from hf_models import check_exported_as_it_came_in, hf_masked_lm_dir
from hf_tokenizers import byte_bpe_tokenizer_dir, local_texts, xlmr_tokenizer_dir

from roberta_pl.checkpoints import load_pretrained
from roberta_pl.checks import find_resume_checkpoint, read_checkpoint

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
BIN = Path(sys.executable).parent
STEPS, STOP = 6, 3
# 2 ranks x micro-batch 2 x accumulation 2 = 8 blocks of 64 a step; fp32, so a resume can be compared bit for bit.
SMALL = ["batch.seq_len=64", "batch.global_batch_size=8", "batch.micro_batch_size=2", "trainer.accelerator=cpu",
         "trainer.precision=32-true", f"trainer.max_steps={STEPS}", "trainer.val_every_n_steps=3",
         "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
         f"checkpoint.every_n_steps={STOP}", "checkpoint.keep=5", "data.num_workers=0", "fill_mask=[]", "logger=csv",
         "optim.lr=3e-3", "optim.warmup_steps=2"]
DDP = ["trainer=ddp", "trainer.devices=2"]
ZERO2 = ["trainer=deepspeed_zero2", "trainer.devices=2"]
SAMPLES = ["The <mask> statement is used to leave a loop early.", "  Indented:\tand tabbed, naïve café — ünïcode.",
           "x = [1, 2, 3]  # a list"]


@dataclass
class Model:
    model_type: str
    model_dir: Path  # the HF directory continued from: config, weights, its own tokenizer files
    shards: Path  # shards written with its tokenizer


def _build(base: Path, model_type: str) -> Model:
    from data_pipelines.shards import write_shards

    texts = local_texts(3000)
    builder = byte_bpe_tokenizer_dir if model_type == "roberta" else xlmr_tokenizer_dir
    model_dir = hf_masked_lm_dir(base / "model", builder(base / "tokenizer", texts[:2000]), model_type)
    corpus = base / "corpus.txt"  # documents of 20 lines, separated by blank lines
    corpus.write_text("\n\n".join("\n".join(texts[i:i + 20]) for i in range(0, len(texts), 20)) + "\n")
    write_shards(corpus, model_dir, base / "shards", num_shards=3, valid_fraction=0.1, num_workers=0, progress=False)
    return Model(model_type, model_dir, base / "shards")


def _train(run_dir: Path, model: Model, *extra: str) -> str:
    """``python -m roberta_pl.pretraining.app pretrained=DIR ...`` in its own process; its output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", *SMALL, f"pretrained={model.model_dir}",
           f"data.train_shards={model.shards}", f"data.valid_shards={model.shards}", f"run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _first_batches(folder: Path) -> str:
    """Every rank saves its first micro-batch and its loss before any update to ``folder/step0-rank<R>.pt``."""
    path = f"{folder}/step0-rank${{oc.env:LOCAL_RANK,0}}.pt"
    return f"trainer.callbacks=[{{_target_:hf_models.FirstBatchLoss,path:'{path}'}}]"


@dataclass
class Runs:
    model: Model
    straight: Path  # 2 ranks, steps 1-6 in one go, each rank's first batch recorded in straight.parent
    resumed: Path  # 2 ranks, stopped at step 3, then resume=auto to step 6
    stopped: Path  # a copy of `resumed` as it was at step 3, in another directory
    logs: tuple[str, str]  # the stopping run's output, the resuming run's


def _runs(base: Path, model: Model, trainer: list[str]) -> Runs:
    straight, resumed, stopped = base / "straight", base / "resumed", base / "stopped"
    _train(straight, model, *trainer, _first_batches(base))
    first = _train(resumed, model, *trainer, f"trainer.stop_at_step={STOP}")
    shutil.copytree(resumed, stopped, symlinks=True)
    second = _train(resumed, model, *trainer)
    return Runs(model, straight, resumed, stopped, (first, second))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("ddp")
    return _runs(base, _build(base, "roberta"), DDP)


@pytest.fixture(scope="module")
def zero2_runs(tmp_path_factory) -> Runs:
    # XLM-R's layout: an export of `roberta` type proves nothing, since it is the default.
    base = tmp_path_factory.mktemp("zero2")
    return _runs(base, _build(base, "xlm-roberta"), ZERO2)


def _assert_step_zero_is_the_models_on_both_ranks(runs: Runs) -> None:
    hf = transformers.AutoModelForMaskedLM.from_pretrained(runs.model.model_dir).eval()
    batches = []
    for rank in (0, 1):
        record = torch.load(runs.straight.parent / f"step0-rank{rank}.pt", weights_only=True)
        batch = record["batch"]
        with torch.no_grad():
            expected = hf(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          labels=batch["labels"]).loss
        assert (batch["labels"] != -100).sum() > 10
        assert abs(record["loss"] - float(expected)) < 1e-5, (rank, record["loss"], float(expected))
        batches.append(batch["input_ids"])
    assert not torch.equal(*batches)  # two ranks, two batches: each rank's own weights were checked


def _assert_it_trained(run: Path) -> None:
    history = json.loads((run / "metrics_history.json").read_text())
    loss = {h["step"]: h["train_loss"] for h in history if "train_loss" in h}
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in loss.values()), loss
    assert sum(loss[s] for s in (4, 5, 6)) < sum(loss[s] for s in (1, 2, 3)), loss
    assert json.loads((run / "summary.json").read_text())["global_step"] == STEPS


def _assert_resume_logs(runs: Runs) -> None:
    first, second = runs.logs
    assert "Continuing pretraining from" in first, first[-3000:]
    # resume=auto: from the run's own checkpoint, not from the pretrained directory again
    assert "Resuming from" in second and "Continuing pretraining from" not in second, second[-3000:]


def _assert_exported_as_it_came_in(run: Path, model: Model) -> None:
    """The run's own export: DIR's model type and class, its tokenizer files byte for byte and the same ids, and the
    trained weights (the final checkpoint's logits, not DIR's)."""
    tok, hf, enc = check_exported_as_it_came_in(run / "hf", model.model_dir, model.model_type,
                                                run / "checkpoints" / "last.ckpt", SAMPLES)
    before = transformers.AutoModelForMaskedLM.from_pretrained(model.model_dir).eval()
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        got = hf(**enc).logits
        loaded = before(**enc).logits
    assert (got[real] - loaded[real]).abs().max() > 1e-3  # trained, not DIR's weights written back


@pytest.mark.slow
def test_ddp_continued_run_starts_from_the_model_on_both_ranks_resumes_exactly_and_exports(ddp_runs):
    _assert_step_zero_is_the_models_on_both_ranks(ddp_runs)
    _assert_it_trained(ddp_runs.straight)
    _assert_resume_logs(ddp_runs)
    a = torch.load(ddp_runs.straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ddp_runs.resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS and a["lr_schedulers"] == b["lr_schedulers"]
    assert a["hyper_parameters"]["pretrained"] == str(ddp_runs.model.model_dir)
    assert a["hyper_parameters"]["model"]["hidden_size"] == 64  # the model's, not the tiny preset's
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # bit for bit on CPU
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i, moments in sa.items():
        assert all(torch.equal(v, sb[i][k]) for k, v in moments.items()), i
    _assert_exported_as_it_came_in(ddp_runs.straight, ddp_runs.model)
    _assert_exported_as_it_came_in(ddp_runs.resumed, ddp_runs.model)


@pytest.mark.slow
def test_zero2_continued_run_starts_from_the_model_on_both_ranks_resumes_exactly_and_exports(zero2_runs):
    from test_world_size_resume import _universal_state

    from roberta_pl.strategies import zero_checkpoint_ranks

    _assert_step_zero_is_the_models_on_both_ranks(zero2_runs)
    _assert_it_trained(zero2_runs.straight)
    _assert_resume_logs(zero2_runs)
    a_dir, b_dir = (r / "checkpoints" / "last.ckpt" for r in (zero2_runs.straight, zero2_runs.resumed))
    assert a_dir.is_dir() and zero_checkpoint_ranks(a_dir) == zero_checkpoint_ranks(b_dir) == 2
    a, b = read_checkpoint(a_dir), read_checkpoint(b_dir)
    assert a["global_step"] == b["global_step"] == STEPS and a["lr_schedulers"] == b["lr_schedulers"]
    assert a["hyper_parameters"]["pretrained"] == str(zero2_runs.model.model_dir)
    # The consolidated fp32 parameters (what export reads), and per parameter Adam's moments and step, bit for bit.
    pa, pb = (load_pretrained(d)[0].state_dict() for d in (a_dir, b_dir))
    assert pa.keys() == pb.keys()
    for k, v in pa.items():
        assert v.dtype == torch.float32 and torch.equal(v, pb[k]), k
    ua, ub = _universal_state(a_dir), _universal_state(b_dir)
    assert {k[1] for k in ua} == {"fp32", "exp_avg", "exp_avg_sq", "step"} and ua.keys() == ub.keys()
    for key, value in ua.items():
        assert torch.equal(value, ub[key]), key
    _assert_exported_as_it_came_in(zero2_runs.straight, zero2_runs.model)
    _assert_exported_as_it_came_in(zero2_runs.resumed, zero2_runs.model)


@pytest.mark.slow
def test_a_two_rank_continued_checkpoint_resumes_on_one_rank_to_the_end(ddp_runs, tmp_path):
    run = tmp_path / "run"
    _train(run, ddp_runs.model, *DDP, f"trainer.stop_at_step={STOP}")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == STOP
    logs = _train(run, ddp_runs.model, "trainer=ddp", "trainer.devices=1")
    assert "Resuming from" in logs and "Continuing pretraining from" not in logs, logs[-3000:]
    assert "the checkpoint's plan was 2 rank(s) x 1 reader(s), micro-batch 2, accumulation 2; now 1 x 1" in logs, \
        logs[-3000:]
    _assert_it_trained(run)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == STEPS and final["MLMDataModule"]["world_size"] == 1
    assert final["hyper_parameters"]["pretrained"] == str(ddp_runs.model.model_dir)
    _assert_exported_as_it_came_in(run, ddp_runs.model)


@pytest.mark.slow
def test_a_continued_run_moved_to_another_directory_resumes_into_its_own_last_checkpoint(ddp_runs):
    run = ddp_runs.stopped  # 2 DDP ranks stopped at step 3 in `resumed`, copied here before it resumed
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == STOP
    _train(run, ddp_runs.model, *DDP)
    assert json.loads((run / "summary.json").read_text())["global_step"] == STEPS
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    resume = find_resume_checkpoint(run)
    assert torch.load(resume, weights_only=True, mmap=True)["global_step"] == STEPS
