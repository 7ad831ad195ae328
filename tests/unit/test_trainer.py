"""roberta_pl/trainer.py: what the Trainer builder decides on its own."""

import lightning.pytorch as pl
import torch

from data_pipelines.shards import available_cpus
from roberta_pl.trainer import share_cpu_threads


def test_cpu_ranks_share_the_cores_and_an_explicit_omp_num_threads_is_kept(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(available_cpus())
        two_ranks = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
        assert share_cpu_threads(two_ranks) == max(1, available_cpus() // 2) == torch.get_num_threads()
        torch.set_num_threads(available_cpus())
        one_rank = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        assert share_cpu_threads(one_rank) is None and torch.get_num_threads() == available_cpus()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert share_cpu_threads(two_ranks) is None and torch.get_num_threads() == available_cpus()
    finally:
        torch.set_num_threads(before)
