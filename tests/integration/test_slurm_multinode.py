"""Multi-node training through Slurm, on one machine: a 2-node local cluster (two slurmd daemons on
127.0.0.1, node names that resolve to nothing), the project's own `train_multinode.sbatch` with the real
trainer on 2 nodes x 1 task, requeued mid-run, resumed, and compared with the same run on 1 node x 2 tasks.

What it proves: the template finds a rendezvous address the ranks can reach when node names do not resolve
(Slurm's NodeAddr), DDP spans Slurm nodes, a requeue resumes the multi-node run in the same run dir, and
the topology does not change the result: same global batch and world size, so the final weights,
optimizer state and step are bit-for-bit those of the 1-node run (gloo sums the same two gradients in
the same order whichever node each rank runs on; data order and masks depend on (seed, step, rank) only).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from slurm_helpers import (
    TEMPLATE_1NODE,
    TEMPLATE_MULTINODE,
    TESTS_DIR,
    SlurmTimeout,
    job_log,
    pause_override,
    start_cluster,
)
from test_slurm_train import TINY

pytestmark = pytest.mark.slow

HOST = socket.gethostname().split(".")[0]
# 12 steps, a checkpoint every 4; validation once, at 8 (so no save happens between the step-4 checkpoint
# and the pause at step 6: the requeue loses steps 5 and 6, which the restart must redo identically).
STEPS = ["trainer.max_steps=12", "checkpoint.every_n_steps=4", "trainer.val_every_n_steps=8"]


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A 2-node local cluster of its own (own state dir and ports); its daemons are stopped at the end."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_two_node_cluster_runs_one_task_per_node(two_node_cluster):
    assert two_node_cluster.nodes() == {f"{HOST}-n1": "idle", f"{HOST}-n2": "idle"}
    node = two_node_cluster.run("scontrol", "show", "node", "-o", f"{HOST}-n2").stdout
    assert "NodeAddr=127.0.0.1" in node and f"NodeHostName={HOST}" in node, node


def job_env(run_dir: Path) -> dict[str, str]:
    """This interpreter's roberta-pl-train first on PATH; tests/ on PYTHONPATH for slurm_helpers.PauseAtStep.

    OMP_NUM_THREADS=1 in both runs: without it Lightning gives each rank cores // ranks-per-node intra-op
    threads (2 on 2 nodes x 1 task, 1 on 1 node x 2 tasks here), and a different thread count splits the
    matmul sums differently: the weights then differ in the last bits (~4e-9 after 4 steps)."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RUN_DIR": str(run_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
            "LOGGER": "none", "OMP_NUM_THREADS": "1"}


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_tree(a, b, where="checkpoint"):
    """Nested dicts/lists equal, tensors by torch.equal (same dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_two_nodes_requeued_mid_run_equal_one_node_two_tasks(two_node_cluster, tmp_path, shard_dir, tokenizer_dir):
    cluster = two_node_cluster
    data = [f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    cpu = ["--gres=none", "--time=30"]

    # 2 nodes x 1 task, paused at step 6 on its first run, then requeued.
    multi, marker = tmp_path / "multi", tmp_path / "paused"
    job = cluster.submit(TEMPLATE_MULTINODE, *cpu, "--nodes=2", "--ntasks-per-node=1", "--job-name=multi", cwd=tmp_path,
                         env=job_env(multi), script_args=[*TINY, *data, *STEPS, pause_override(6, marker)])
    log = job_log(multi, "multi", job)
    try:
        cluster.wait_for_files(job, [f"{marker}.rank{r}" for r in (0, 1)], 300, "both ranks to reach step 6", log)
        running = cluster.job(job)
        assert running["NodeList"] == f"{HOST}-n[1-2]" and running["NumNodes"] == "2", running
        assert final_checkpoint(multi)["global_step"] == 4  # steps 5 and 6 are not saved: the restart redoes them
        cluster.requeue(job)
        info = cluster.wait_for_state(job, "COMPLETED", timeout=300)
    finally:
        cluster.cancel(job)
    text = log.read_text()
    assert info["Restarts"] == "1", cluster.describe(job, info, log)
    # The node names resolve to nothing here: the rendezvous is the first node's NodeAddr.
    port = 15000 + int(job) % 10000
    assert f"job {job} restart 0: 2 node(s) x 1 task(s)" in text and f"rendezvous 127.0.0.1:{port}" in text, text
    assert f"job {job} restart 1:" in text and f"Resuming from {multi}/checkpoints/last.ckpt" in text, text[-3000:]

    # The same run on 1 node x 2 tasks (same global batch and world size), uninterrupted.
    single = tmp_path / "single"
    ref = cluster.submit(TEMPLATE_1NODE, *cpu, "--nodes=1", "--ntasks-per-node=2", "--job-name=single",
                         cwd=tmp_path, env=job_env(single), script_args=[*TINY, *data, *STEPS])
    try:
        cluster.wait_for_state(ref, "COMPLETED", timeout=300)
    except SlurmTimeout as err:
        raise SlurmTimeout(f"{err}\n{cluster.describe(ref, cluster.job(ref), job_log(single, 'single', ref))}") from None
    finally:
        cluster.cancel(ref)

    a, b = final_checkpoint(multi), final_checkpoint(single)
    assert a["global_step"] == b["global_step"] == 12
    assert a["MLMDataModule"]["world_size"] == b["MLMDataModule"]["world_size"] == 2
    assert_same_tree(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tree(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert_same_tree(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert_same_tree(a["MLMDataModule"], b["MLMDataModule"], "MLMDataModule")
