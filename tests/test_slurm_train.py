"""The project's own sbatch template with the real trainer on a real local Slurm cluster: 2 tasks (CPU,
gloo), checkpoints, `scontrol requeue`, resume in the same run directory and the same W&B run; and a Hydra
multirun through the submitit Slurm launcher."""

import subprocess
import sys

import pytest
import torch
from slurm_helpers import CPU_SBATCH_ARGS, TEMPLATE_1NODE, slurm_cluster, wait_until  # noqa: F401

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.max_seq_len=64", "batch.seq_len=64",
        "batch.global_batch_size=8", "batch.micro_batch_size=4", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "fill_mask=[]"]


@pytest.mark.slow
def test_template_trains_survives_requeue_and_resumes_same_run(slurm_cluster, tmp_path, shard_dir, tokenizer_dir):
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}",
                 f"data.tokenizer={tokenizer_dir}", "trainer.max_steps=400", "trainer.val_every_n_steps=200",
                 "checkpoint.every_n_steps=10"]
    job = slurm_cluster.submit(TEMPLATE_1NODE, *CPU_SBATCH_ARGS, "--time=10", "--job-name=train", cwd=tmp_path,
                               script_args=overrides, env={"RUN_DIR": str(run_dir)})
    try:
        last = run_dir / "checkpoints" / "last.ckpt"
        wait_until(last.exists, 240, "a first checkpoint")
        first_id = (run_dir / "wandb_run_id.txt").read_text().strip()
        slurm_cluster.requeue(job)
        info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=400)
    finally:
        slurm_cluster.cancel(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job, info)
    log = (tmp_path / f"train-{job}.out").read_text()
    assert "Resuming from" in log and f"{run_dir}/checkpoints/" in log, log[-3000:]
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 400
    # Both ranks trained (DDP over 2 Slurm tasks) and the same W&B run continued after the requeue.
    assert final["MLMDataModule"]["world_size"] == 2 and final["MLMDataModule"]["consumed"] == 400
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == first_id
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{first_id}"))
    assert len(segments) == 2, segments
    assert (run_dir / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_hydra_multirun_through_submitit_slurm_launcher(slurm_cluster, tmp_path, shard_dir, tokenizer_dir):
    sweep = tmp_path / "lr"
    cmd = [sys.executable, "-m", "roberta_pl.train", "-m", "hydra/launcher=slurm", "optim.lr=1e-3,2e-3",
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
