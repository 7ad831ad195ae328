"""DataLoader workers must not act on Slurm's requeue signal (only the training process checkpoints)."""

import os
import signal
import time

import psutil

from data_pipelines.datamodule import DataSettings, MLMDataModule


def test_workers_ignore_sigusr1_the_main_process_handles_it(tmp_path, shard_dir, tokenizer_dir):
    fired = tmp_path / "fired"

    def handler(signum, frame):  # stands in for Lightning's requeue handler, inherited by forked workers
        with open(fired, "a") as fh:
            fh.write(f"{os.getpid()}\n")

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        dm = MLMDataModule(shard_dir, tokenizer_dir, settings=DataSettings(num_workers=1)).connect(64, 4)
        dm.setup()
        loader = iter(dm.train_dataloader())
        next(loader)
        workers = [p for p in psutil.Process().children() if p.name() == "pt_data_worker"]
        assert len(workers) == 1
        os.kill(workers[0].pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert workers[0].is_running() and workers[0].status() != psutil.STATUS_ZOMBIE
        next(loader)  # the worker keeps serving batches
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert fired.read_text().split() == [str(os.getpid())]  # only the main process ran the handler
    finally:
        signal.signal(signal.SIGUSR1, old)
