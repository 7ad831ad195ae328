"""The project's own sbatch template with the real trainer on a real local Slurm cluster: 2 tasks (CPU,
gloo), checkpoints, `scontrol requeue` and the template's SIGUSR1 near the time limit, resume in the same
run directory and the same W&B run; and a Hydra multirun through the submitit Slurm launcher.

The training jobs hold at a known step (`slurm_helpers.PauseAtStep`) until the test has acted, so what
happens mid-run does not depend on how fast this machine is."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from slurm_helpers import (  # noqa: F401  (slurm_cluster is a fixture, found by name)
    CPU_SBATCH_ARGS,
    TEMPLATE_1NODE,
    TESTS_DIR,
    job_log,
    pause_override,
    slurm_cluster,
)

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.max_seq_len=64", "batch.seq_len=64",
        "batch.global_batch_size=8", "batch.micro_batch_size=4", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "fill_mask=[]"]


def job_setup(run_dir: Path, marker: Path, shard_dir, tokenizer_dir, *, steps: int, val: int, ckpt: int, log: int,
              pause: int, **env) -> tuple[list[str], dict[str, str]]:
    """The overrides and environment of a template job on the tiny model that holds at step ``pause``."""
    overrides = [*TINY, f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}",
                 f"data.tokenizer={tokenizer_dir}", f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={val}",
                 f"checkpoint.every_n_steps={ckpt}", f"trainer.log_every_n_steps={log}", pause_override(pause, marker)]
    env = {"RUN_DIR": str(run_dir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])), **env}
    return overrides, env


@pytest.mark.slow
def test_template_trains_survives_requeue_and_resumes_same_run(slurm_cluster, tmp_path, shard_dir, tokenizer_dir):
    from wandb_records import history_and_config

    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    # Checkpoints at 10, 20, ...; the first run stops at step 15 (PauseAtStep) and waits there, so the
    # requeue below comes mid-run whatever the machine's speed: steps 11-15 are lost and redone.
    overrides, env = job_setup(run_dir, marker, shard_dir, tokenizer_dir, steps=40, val=20, ckpt=10, log=5,
                               pause=15)
    # --time=60: far from the limit, so the template's SIGUSR1 (which would requeue the job by itself)
    # cannot come during the test.
    job = slurm_cluster.submit(TEMPLATE_1NODE, *CPU_SBATCH_ARGS, "--time=60", "--job-name=train", cwd=tmp_path,
                               script_args=overrides, env=env)
    log = job_log(run_dir, "train", job)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        slurm_cluster.wait_for_files(job, [f"{marker}.rank{r}" for r in (0, 1)], 300, "both ranks to reach step 15", log)
        assert torch.load(last, weights_only=True)["global_step"] == 10
        first_id = (run_dir / "wandb_run_id.txt").read_text().strip()
        slurm_cluster.requeue(job)
        info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=400)
    finally:
        slurm_cluster.cancel(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job, info, log)
    text = log.read_text()
    assert f"Resuming from {run_dir}/checkpoints/last.ckpt" in text, text[-3000:]
    assert not list(tmp_path.glob("*.out"))  # the log is under the run dir, not in the submit dir
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 40
    # Both ranks trained (DDP over 2 Slurm tasks) and the same W&B run continued after the requeue.
    assert final["MLMDataModule"]["world_size"] == 2 and final["MLMDataModule"]["consumed"] == 40
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == first_id
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{first_id}"))
    assert len(segments) == 2, segments
    # The restart's offline segment holds the run from the checkpoint (step 10) on, on the x-axis Lightning
    # defines for W&B (trainer/global_step, logged every 5 steps); the first segment holds the steps before.
    # So syncing both segments (README §5) gives one run with the whole history.
    rows, _ = history_and_config(segments[1] / f"run-{first_id}.wandb")
    steps = [r["trainer/global_step"] for r in rows if "train/loss" in r]
    assert steps and 10 <= steps[0] <= 15 and max(steps) >= 35, steps
    assert (run_dir / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_template_with_zero3_survives_requeue_and_resumes_same_run(slurm_cluster, tmp_path, shard_dir, tokenizer_dir):
    """The same template with `TRAINER=deepspeed_zero3`: 2 CPU tasks shard parameters and optimizer state, each
    writes its partition of the checkpoint directory, and the requeued job resumes from them."""
    from roberta_pl.checks import read_checkpoint

    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    overrides, env = job_setup(run_dir, marker, shard_dir, tokenizer_dir, steps=12, val=6, ckpt=4, log=2,
                               pause=6, TRAINER="deepspeed_zero3")
    job = slurm_cluster.submit(TEMPLATE_1NODE, *CPU_SBATCH_ARGS, "--time=60", "--job-name=zero3", cwd=tmp_path,
                               script_args=overrides, env=env)
    log = job_log(run_dir, "zero3", job)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        slurm_cluster.wait_for_files(job, [f"{marker}.rank{r}" for r in (0, 1)], 400, "both ranks to reach step 6", log)
        assert last.is_dir() and read_checkpoint(last)["global_step"] == 4
        first_id = (run_dir / "wandb_run_id.txt").read_text().strip()
        slurm_cluster.requeue(job)
        info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=500)
    finally:
        slurm_cluster.cancel(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job, info, log)
    text = log.read_text()
    assert f"Resuming from {run_dir}/checkpoints/last.ckpt: step 4, data position 4" in text, text[-3000:]
    final = read_checkpoint(last)
    assert final["global_step"] == 12
    assert final["MLMDataModule"]["world_size"] == 2 and final["MLMDataModule"]["consumed"] == 12
    assert len(list((last / "checkpoint").glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 2
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == first_id
    assert (run_dir / "hf" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def usr1_run(slurm_cluster, tmp_path_factory, shard_dir, tokenizer_dir):
    """The whole auto-requeue cycle with the real trainer, run once for the tests below: both ranks hold at
    step 15 (their SIGUSR1 handler installed long before), the time limit is brought near so that Slurm's
    own timer sends the template's --signal=SIGUSR1@90, the trainer saves last.ckpt at the next step
    boundary and requeues, and the restart resumes from it and finishes at step 30."""
    tmp = tmp_path_factory.mktemp("usr1")
    run_dir, marker = tmp / "run", tmp / "paused"
    overrides, env = job_setup(run_dir, marker, shard_dir, tokenizer_dir, steps=30, val=20, ckpt=10, log=5,
                               pause=15)
    job = slurm_cluster.submit(TEMPLATE_1NODE, *CPU_SBATCH_ARGS, "--time=30", "--job-name=usr1", cwd=tmp,
                               script_args=overrides, env=env)
    log = job_log(run_dir, "usr1", job)
    try:
        slurm_cluster.wait_for_files(job, [f"{marker}.rank{r}" for r in (0, 1)], 300, "both ranks to reach step 15", log)
        first_id = (run_dir / "wandb_run_id.txt").read_text().strip()
        slurm_cluster.bring_signal_near(job)  # Slurm's own timer then sends the template's SIGUSR1
        slurm_cluster.push_limit_back_after_requeue(job, 30)
        info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=240)
    finally:
        slurm_cluster.cancel(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job, info, log)
    return {"job": job, "run_dir": run_dir, "log": log.read_text(), "wandb_id": first_id}


@pytest.mark.slow
def test_template_sigusr1_near_the_time_limit_requeues_at_a_step_and_resumes(usr1_run):
    run_dir, job, text = usr1_run["run_dir"], usr1_run["job"], usr1_run["log"]
    # The signal stopped the run at the next optimizer-step boundary (16) and saved there, not mid-step.
    assert f"Signal SIGUSR1: saved {run_dir}/checkpoints/last.ckpt at step 16; requeueing Slurm job {job}" in text, text
    assert f"job {job} restart 1:" in text
    assert f"Resuming from {run_dir}/checkpoints/last.ckpt" in text, text[-3000:]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 30 and final["MLMDataModule"]["consumed"] == 30
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{usr1_run['wandb_id']}"))
    assert len(segments) == 2, segments


@pytest.mark.slow
def test_template_sigusr1_requeue_keeps_the_first_wandb_segment(usr1_run):
    # The requeue waits until the run has finished its W&B run: a requeue signals every process of the job,
    # wandb's writer included, which lost the first segment's buffered records when it came first.
    from wandb_records import read_records

    run_id = usr1_run["wandb_id"]
    first = sorted((usr1_run["run_dir"] / "wandb").glob(f"offline-run-*-{run_id}"))[0]
    records = read_records(first / f"run-{run_id}.wandb")
    kinds = [r.WhichOneof("record_type") for r in records]
    # Everything the first run logged before the signal is on disk, finished, for `wandb sync` to upload.
    assert "history" in kinds and kinds[-1] == "exit", f"{first}: {len(records)} records {kinds[-3:]}"


@pytest.mark.slow
def test_hydra_multirun_through_submitit_slurm_launcher(slurm_cluster, tmp_path, shard_dir, tokenizer_dir):
    sweep = tmp_path / "lr"
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", "-m", "hydra/launcher=slurm", "optim.lr=1e-3,2e-3",
           f"run_dir={sweep}", "hydra.launcher.tasks_per_node=1", "hydra.launcher.timeout_min=10", *TINY,
           f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}",
           "trainer.max_steps=6", "trainer.val_every_n_steps=3", "checkpoint.every_n_steps=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=slurm_cluster.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "lr-sweep").iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert list((tmp_path / "lr-sweep" / ".submitit").iterdir())  # submitted through Slurm, not run locally
