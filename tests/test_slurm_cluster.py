"""The local Slurm cluster is real: a node comes up idle, multi-task jobs run, requeue restarts jobs.

These start real munged/slurmctld/slurmd daemons through `launch/slurm/local_cluster.sh` (installing
the Debian packages on first use, as root). They are what the sbatch templates and the training
through Slurm tests stand on, so a broken cluster shows up here first, with the daemon logs.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from slurm_helpers import (  # noqa: F401  (slurm_cluster is a fixture, found by name)
    CLUSTER_SCRIPT,
    SlurmTimeout,
    read_env_file,
    slurm_cluster,
    wait_until,
    write_job_script,
)

pytestmark = pytest.mark.slow


def test_node_comes_up_idle_with_this_machines_cpus(slurm_cluster):
    hostname = socket.gethostname().split(".")[0]
    assert slurm_cluster.node_state() == "idle"
    node = slurm_cluster.run("scontrol", "show", "node", "-o", hostname).stdout
    # The node's CPUs come from `slurmd -C`, so they must match what this machine has.
    nproc = subprocess.run(["nproc", "--all"], capture_output=True, text=True, check=True).stdout.strip()
    assert f"CPUTot={nproc}" in node, node
    assert "Partitions=debug" in node, node


def test_start_again_only_reports(slurm_cluster):
    out = slurm_cluster.script("start", timeout=60)
    assert "already running" in out.stderr
    assert f"SLURM_CONF={slurm_cluster.conf}" in out.stdout
    assert slurm_cluster.node_state() == "idle"


def test_help_documents_the_commands():
    out = subprocess.run(["bash", str(CLUSTER_SCRIPT), "--help"], capture_output=True, text=True, check=True)
    for command in ("start", "stop", "status", "SLURM_CONF"):
        assert command in out.stdout
    bad = subprocess.run(["bash", str(CLUSTER_SCRIPT), "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_two_task_job_runs_both_ranks(slurm_cluster, tmp_path):
    # The batch script runs once; `srun` inside it starts one task per rank, as the sbatch templates
    # do for `roberta-pl-train`. Each task writes its own file so ranks cannot hide behind each other.
    script = write_job_script(tmp_path / "two_tasks.sh", """
srun bash -c 'echo "rank=$SLURM_PROCID of $SLURM_NTASKS local=$SLURM_LOCALID" > "rank.$SLURM_PROCID"'
""")
    job = slurm_cluster.submit(script, "--ntasks=2", "--output=job.out", cwd=tmp_path)
    info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=60)
    assert info["ExitCode"] == "0:0"
    assert info["NumTasks"] == "2"
    ranks = sorted(p.read_text().strip() for p in tmp_path.glob("rank.*"))
    assert ranks == ["rank=0 of 2 local=0", "rank=1 of 2 local=1"]


def test_scontrol_requeue_runs_the_job_again(slurm_cluster, tmp_path):
    # Each run appends a line and dumps its environment, then sleeps as a long training job would.
    script = write_job_script(tmp_path / "sleeper.sh", """
restart=${SLURM_RESTART_COUNT:-0}
env -0 > "env.$restart"
echo "run restart=$restart job=$SLURM_JOB_ID" >> runs.txt
sleep 300
""")
    runs = tmp_path / "runs.txt"
    job = slurm_cluster.submit(script, "--ntasks=1", "--output=job.out", cwd=tmp_path)
    try:
        slurm_cluster.wait_for_state(job, "RUNNING", timeout=60)
        wait_until(lambda: runs.exists() and runs.read_text(), 30, "the first run to write runs.txt")

        slurm_cluster.requeue(job)
        try:
            wait_until(lambda: len(runs.read_text().splitlines()) >= 2, 90, "the requeued job to run again")
        except SlurmTimeout as err:
            raise SlurmTimeout(f"{err}\n{slurm_cluster.describe(job, slurm_cluster.job(job))}") from None
        info = slurm_cluster.wait_for_state(job, "RUNNING", timeout=30)
    finally:
        slurm_cluster.cancel(job)

    assert runs.read_text().splitlines() == [f"run restart=0 job={job}", f"run restart=1 job={job}"]
    assert info["Restarts"] == "1"
    first, second = read_env_file(tmp_path / "env.0"), read_env_file(tmp_path / "env.1")
    # A requeue keeps the job id (and name): that is why run dirs are keyed on them, never on time.
    assert first["SLURM_JOB_ID"] == second["SLURM_JOB_ID"] == job
    assert "SLURM_RESTART_COUNT" not in first
    assert second["SLURM_RESTART_COUNT"] == "1"
    # sbatch exported the submit environment, so the job can reach the same cluster with srun.
    assert second["SLURM_CONF"] == str(slurm_cluster.conf)


def test_a_failing_job_is_reported_failed(slurm_cluster, tmp_path):
    # Guards the helpers themselves: a waiter for COMPLETED must not be satisfied by a failure.
    script = write_job_script(tmp_path / "fail.sh", "srun false\n")
    job = slurm_cluster.submit(script, "--output=job.out", cwd=tmp_path)
    with pytest.raises(AssertionError, match="ended FAILED"):
        slurm_cluster.wait_for_state(job, "COMPLETED", timeout=60)
