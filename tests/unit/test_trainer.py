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


_FAULTS = """
import os, resource, sys
import lightning.pytorch as pl, torch
from roberta_pl.trainer import keep_freed_memory
trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
print(keep_freed_memory(trainer))
for _ in range(3):
    torch.ones(16 * 128 * 1024).sum()  # a 16 MiB tensor a step, as a step's logits
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 * 128 * 1024).sum()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_a_cpu_run_reuses_the_memory_it_freed_unless_the_user_set_the_allocator(tmp_path):
    # In a fresh process each (the setting is process-wide): a freed 16 MiB tensor comes back without page faults.
    import os
    import subprocess
    import sys

    def run(**env) -> tuple[str, float]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
        proc = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=600,
                              env=clean | env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        applied, faults = proc.stdout.split()[-2:]
        return applied, float(faults)

    applied, faults = run()
    assert applied == "True" and faults < 100, faults  # reused: no new pages
    applied, faults = run(MALLOC_MMAP_THRESHOLD_="131072")  # the user's own glibc setting is left alone
    assert applied == "False" and faults > 1000, faults  # a fresh mapping (4,096 pages) every time
