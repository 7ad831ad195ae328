"""roberta_pl/trainer.py: what the Trainer builder decides on its own."""

import lightning.pytorch as pl
import pytest
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


def test_a_slurm_rank_keeps_its_own_cpus_and_other_ranks_share_the_node(monkeypatch):
    """Under Slurm's per-task binding a rank's affinity mask is already its own cores (SLURM_CPUS_PER_TASK of them):
    dividing them again by the ranks per node left each rank 1/N of its share."""
    from roberta_pl.trainer import rank_cpus

    cpus = available_cpus()
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert rank_cpus(2) == max(1, cpus // 2) and rank_cpus(1) == cpus
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cpus))
    assert rank_cpus(2) == cpus  # its own cores, not half of them
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cpus + 6))
    assert rank_cpus(2) == cpus  # never more than the mask allows
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cpus))
        two_ranks = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
        assert share_cpu_threads(two_ranks) == cpus == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_the_timed_rendezvous_starts_the_group_as_lightning_would(monkeypatch):
    """What the rendezvous passes to init_process_group besides the store: Lightning's collective timeout and, on
    CUDA, the rank's device (NCCL binds its communicator to it), which the timed path used to drop."""
    import inspect

    from lightning.pytorch.strategies import DDPStrategy

    from roberta_pl.strategies import ZeroStrategy, process_group_options

    source = inspect.getsource(DDPStrategy.setup_distributed)  # lightning 2.6.6: what we mirror
    assert 'kwargs["device_id"] = self.root_device if self.root_device.type != "cpu" else None' in source
    cpu = DDPStrategy(accelerator="cpu", parallel_devices=[torch.device("cpu")] * 2)
    assert process_group_options(cpu) == {"timeout": cpu._timeout, "device_id": None}
    from lightning.fabric.plugins.environments import LightningEnvironment

    monkeypatch.setenv("LOCAL_RANK", "1")  # the second rank of a 2-GPU node
    gpu = DDPStrategy(parallel_devices=[torch.device("cuda", 0), torch.device("cuda", 1)],
                      cluster_environment=LightningEnvironment())
    assert process_group_options(gpu)["device_id"] == torch.device("cuda", 1)
    assert "rendezvous(self)" in inspect.getsource(ZeroStrategy.setup_distributed)  # DeepSpeed gets it too


_FAULTS = """
import os, resource, sys
import lightning.pytorch as pl, torch
from roberta_pl.trainer import keep_freed_memory
trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
print(keep_freed_memory(trainer) if sys.argv[1] == "tune" else "untouched")
# 40 MiB a step, as a step's logits: above the 32 MiB to which glibc's own threshold adapts, so without the
# tuning each one is a fresh mapping (10,240 page faults); a 16 MiB block glibc already reuses by itself.
for _ in range(3):
    torch.ones(40 * 256 * 1024).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(40 * 256 * 1024).sum()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.slow  # ~5-15 s: the full suite runs it, make test-fast does not
def test_a_cpu_run_reuses_the_memory_it_freed_unless_the_user_set_the_allocator(tmp_path):
    # In a fresh process each (the setting is process-wide): a freed 16 MiB tensor comes back without page faults.
    import os
    import subprocess
    import sys

    def run(mode: str = "tune", **env) -> tuple[str, float]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
        proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=600,
                              env=clean | env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        applied, faults = proc.stdout.split()[-2:]
        return applied, float(faults)

    applied, faults = run("leave")  # glibc's defaults: what the tuning is measured against
    assert faults > 5000, faults  # a fresh mapping (10,240 pages) every time
    applied, faults = run()
    assert applied == "True" and faults < 100, faults  # reused: no new pages
    applied, faults = run(MALLOC_MMAP_THRESHOLD_="131072")  # the user's own glibc setting is left alone
    assert applied == "False" and faults > 5000, faults


def test_only_the_training_command_tunes_the_allocator(tmp_path, monkeypatch):
    """The tuning is process-wide and never undone: a library caller's trainer (``run`` in a notebook, say) and a
    fine-tuning trainer leave glibc alone; ``roberta-pl-train``'s own process asks for it."""
    import inspect

    from roberta_pl import harness, trainer
    from roberta_pl.pretraining import app as train
    from roberta_pl.pretraining import trainer as pretraining_trainer

    assert "keep_freed_memory" not in inspect.getsource(trainer.build_trainer)  # fine-tuning builds through it
    assert "r.own_process" in inspect.getsource(train)  # the spec passes the harness's flag on
    assert "own_process=True" in inspect.getsource(harness.entry_point)  # which only the CLI sets
    assert "own_process: bool = False" in inspect.getsource(harness.run)
    assert "if tune_allocator and keep_freed_memory(trainer):" in inspect.getsource(pretraining_trainer.pretraining_trainer)


def test_the_tuned_allocator_hands_free_pages_back_every_n_steps():
    """With the thresholds raised, the heap fragments as the logits change size; ReturnFreedMemory trims it at
    every 100th optimizer step (once per step, whatever the accumulation)."""
    import resource

    from roberta_pl.trainer import ReturnFreedMemory

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trim = ReturnFreedMemory(every_n_steps=100)
    held = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB of heap, then freed: trim gives it back
    del held
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trim.on_train_batch_end(trainer, None, None, None, 0)  # step 0: trims
    assert trim._trimmed_at == 0 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= before
    trim.on_train_batch_end(trainer, None, None, None, 1)  # still step 0 (accumulating): not again
    assert trim._trimmed_at == 0
