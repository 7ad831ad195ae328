"""Hydra multirun on this machine: the basic launcher (with 2-process DDP jobs) and the Optuna sweeper."""

import subprocess
import sys

import pytest
import yaml

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.max_seq_len=64", "batch.seq_len=64",
        "batch.global_batch_size=8", "batch.micro_batch_size=4", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "fill_mask=[]", "trainer.max_steps=4",
        "trainer.val_every_n_steps=2", "checkpoint.every_n_steps=2"]


def _train(tmp_path, *args):
    proc = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_local_multirun_of_ddp_jobs_runs_each_job_once_in_its_own_dir(tmp_path, shard_dir, tokenizer_dir):
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    proc = _train(tmp_path, "-m", "optim.lr=1e-3,2e-3", f"run_dir={tmp_path}/lr", "trainer=ddp",
                  "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", *TINY, *data)
    sweep = tmp_path / "lr-sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        assert (sweep / job / "checkpoints" / "last.ckpt").exists()
        assert (sweep / job / "train_ddp_process_1.log").exists()  # rank 1 ran this job, in this job's dir
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"optim.lr={lr}" in overrides
    # Lightning's rank processes did not start the sweep again: exactly two jobs were launched.
    assert proc.stdout.count("Done: 4 steps") == 2


@pytest.mark.slow
def test_optuna_sweeper_runs_trials_and_minimises_val_loss(tmp_path, shard_dir, tokenizer_dir):
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    _train(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
           f"run_dir={tmp_path}/search", *TINY, *data)
    result = yaml.safe_load((tmp_path / "search-sweep" / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optim.lr", "optim.warmup_steps", "data.mask_prob"}
    assert 0 < result["best_value"] < 10  # a validation loss
    assert len([p for p in (tmp_path / "search-sweep").iterdir() if p.name.isdigit()]) == 3
