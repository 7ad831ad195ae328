"""The local Slurm cluster is real: a node comes up idle, multi-task jobs run, requeue restarts jobs.

These start real munged/slurmctld/slurmd daemons through `launch/slurm/local_cluster.sh` (installing
the Debian packages on first use, as root). They are what the sbatch templates and the training
through Slurm tests stand on, so a broken cluster shows up here first, with the daemon logs.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest
from slurm_helpers import (  # noqa: F401  (slurm_cluster is a fixture, found by name)
    CLUSTER_SCRIPT,
    CPU_SBATCH_ARGS,
    SUBMIT_SCRIPT,
    TEMPLATE_1NODE,
    TEMPLATE_MULTINODE,
    SlurmTimeout,
    job_log,
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


def test_status_and_stop_of_a_cluster_that_is_not_running(tmp_path):
    env = {**os.environ, "ROBERTA_PL_SLURM_DIR": str(tmp_path / "never-started")}
    # Must answer at once (a Slurm client with no controller would retry for a minute; 30 s is slack for load).
    status = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert status.returncode == 1 and "not running" in status.stderr
    stop = subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=30)
    assert stop.returncode == 0


def test_two_task_job_runs_both_ranks(slurm_cluster, tmp_path):
    # The batch script runs once; `srun` inside it starts one task per rank, as the sbatch templates
    # do for `roberta-pl-train`. Each task writes its own file so ranks cannot hide behind each other.
    script = write_job_script(tmp_path / "two_tasks.sh", """
srun bash -c 'echo "rank=$SLURM_PROCID of $SLURM_NTASKS local=$SLURM_LOCALID" > "rank.$SLURM_PROCID"'
""")
    job = slurm_cluster.submit(script, "--ntasks=2", "--output=job.out", cwd=tmp_path)
    info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=120)
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
        wait_until(lambda: runs.exists() and runs.read_text(), 60, "the first run to write runs.txt")

        slurm_cluster.requeue(job)
        try:
            wait_until(lambda: len(runs.read_text().splitlines()) >= 2, 120, "the requeued job to run again")
        except SlurmTimeout as err:
            raise SlurmTimeout(f"{err}\n{slurm_cluster.describe(job, slurm_cluster.job(job))}") from None
        info = slurm_cluster.wait_for_state(job, "RUNNING", timeout=60)
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


# --- the sbatch templates, with a stand-in for roberta-pl-train ------------------------------------
# The stub records, per rank and per restart, the overrides and environment the template gave it, then
# acts like the trainer under Slurm: on the first run it installs its SIGUSR1 trap, says so in a `ready`
# file, and waits for the template's SIGUSR1; rank 0 then requeues the job; on the requeued run it
# "finishes". What is tested is the template and the cluster (flags, topology, stable run dir, signal,
# requeue, appended log), not training.
STUB_TRAINER = r"""#!/bin/bash
set -euo pipefail
run_dir=
for arg in "$@"; do [[ $arg == run_dir=* ]] && run_dir=${arg#run_dir=}; done
restart=${SLURM_RESTART_COUNT:-0}
tag="rank$SLURM_PROCID.restart$restart"
mkdir -p "$run_dir"
printf '%s\n' "$@" > "$run_dir/args.$tag"
env -0 > "$run_dir/env.$tag"
[[ ${STUB_EXIT:-} ]] && exit "$STUB_EXIT"
if [[ $restart == 0 ]]; then
    trap 'echo "$(date +%s)" > "$run_dir/usr1.rank$SLURM_PROCID"
          [[ $SLURM_PROCID == 0 ]] && scontrol requeue "$SLURM_JOB_ID"
          exit 0' USR1
    echo "$(date +%s)" > "$run_dir/ready.rank$SLURM_PROCID"
    sleep 600 & wait
fi
"""


@pytest.fixture
def stub_trainer_env(tmp_path):
    """PATH with a stub `roberta-pl-train` first; the template's srun finds it on every rank."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_job_script(bin_dir / "roberta-pl-train", "").write_text(STUB_TRAINER)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def read_args(run_dir, rank, restart):
    return (run_dir / f"args.rank{rank}.restart{restart}").read_text().splitlines()


def test_template_cpu_job_requeues_on_sigusr1_and_resumes_in_the_same_run_dir(
        slurm_cluster, tmp_path, stub_trainer_env):
    # Slurm sends --signal's SIGUSR1 from slurmctld's periodic time-limit check (every 30 s, so "up to 60 s
    # earlier than specified", man sbatch), to the job steps that exist at that moment. With a short
    # --time the first check could fire before srun had started the tasks (the signal is lost: no
    # requeue) or before their trap was set (SIGUSR1 kills them: FAILED). So the job starts with a long
    # limit, the test waits until both tasks have their trap, and only then brings the end near:
    # TimeLimit = elapsed + 1..2 min puts it within 90 s + 30 s, so the next check sends the template's
    # SIGUSR1, and at least a minute is left for the requeue.
    run_dir = tmp_path / "runs" / "stubrun"
    job = slurm_cluster.submit(TEMPLATE_1NODE, *CPU_SBATCH_ARGS, "--time=30", "--job-name=stubrun",
                               script_args=["trainer.max_steps=7"], cwd=tmp_path, env=stub_trainer_env)
    log = job_log(run_dir, "stubrun", job)
    try:
        slurm_cluster.wait_for_files(job, [run_dir / f"ready.rank{r}" for r in (0, 1)], 120,
                                     "both tasks to install their SIGUSR1 trap", log)
        assert not list(run_dir.glob("usr1.*"))  # no signal yet: the limit is still 30 min away
        slurm_cluster.bring_signal_near(job)
        slurm_cluster.push_limit_back_after_requeue(job, 30)
        info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=150)
    finally:
        slurm_cluster.cancel(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job, info, log)
    # Slurm's SIGUSR1 reached every task (not only the batch shell), as the trainer needs.
    assert (run_dir / "usr1.rank0").exists() and (run_dir / "usr1.rank1").exists()
    for restart in (0, 1):
        for rank in (0, 1):
            args = read_args(run_dir, rank, restart)
            for expected in ("trainer=ddp", "trainer.num_nodes=1", "trainer.devices=2",
                             "trainer.accelerator=cpu", f"run_dir={run_dir}", "resume=auto",
                             "logger=wandb", "logger.mode=offline", "run_name=stubrun"):
                assert expected in args, (restart, rank, args)
            assert args[-1] == "trainer.max_steps=7"  # user overrides come last, so they win
            env = read_env_file(run_dir / f"env.rank{rank}.restart{restart}")
            assert env["SLURM_PROCID"] == str(rank)
            assert env["WANDB_MODE"] == "offline"
            # Rendezvous for Lightning: the node's name (it resolves here), a port from the job id.
            assert env["MASTER_ADDR"] == socket.gethostname().split(".")[0]
            assert env["MASTER_PORT"] == str(15000 + int(job) % 10000)
            assert env["ROBERTA_PL_RENDEZVOUS_TIMEOUT"] == "300"
    # One log for both runs, under the run dir (not the submit dir): a job id that survives the requeue,
    # and appending.
    text = log.read_text()
    assert f"job {job} restart 0:" in text and f"job {job} restart 1:" in text, text
    assert text.index(f"job {job} restart 0:") < text.index(f"job {job} restart 1:")
    assert not list(tmp_path.glob("*.out"))


def test_multinode_template_derives_topology_from_the_allocation(slurm_cluster, tmp_path, stub_trainer_env):
    # Only one node here: --nodes=1 overrides the template's default of 2; the script logic is the same
    # (tests/integration/test_slurm_multinode.py runs it on 2 nodes). An explicit --output wins over the run-dir log.
    env = {**stub_trainer_env, "STUB_EXIT": "0", "EXPERIMENT": "quickstart", "RUN_DIR": str(tmp_path / "fixed"),
           "MASTER_PORT": "23456"}
    job = slurm_cluster.submit(TEMPLATE_MULTINODE, *CPU_SBATCH_ARGS, "--nodes=1", "--output=mine.out",
                               cwd=tmp_path, env=env)
    info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=120)
    assert info["NumTasks"] == "2"
    args = read_args(tmp_path / "fixed", 0, 0)
    assert "experiment=quickstart" in args and "trainer.num_nodes=1" in args and "trainer.devices=2" in args
    assert read_env_file(tmp_path / "fixed" / "env.rank1.restart0")["MASTER_PORT"] == "23456"  # user's wins
    assert f"job {job} restart 0:" in (tmp_path / "mine.out").read_text()
    assert not (tmp_path / "fixed" / "logs").exists()


def test_template_refuses_tasks_that_do_not_match_gpus(slurm_cluster, tmp_path, stub_trainer_env):
    env = {**stub_trainer_env, "STUB_EXIT": "0", "GPUS_PER_NODE": "4"}
    job = slurm_cluster.submit(TEMPLATE_1NODE, *CPU_SBATCH_ARGS, "--job-name=mismatch", cwd=tmp_path, env=env)
    info = slurm_cluster.wait_for_state(job, "FAILED", timeout=120)
    assert info["ExitCode"] == "2:0"
    run_dir = tmp_path / "runs" / "mismatch"
    assert "one task per GPU" in job_log(run_dir, "mismatch", job).read_text()
    assert not list(run_dir.glob("args.*"))  # refused before srun started anything


def test_submit_script_sizes_the_job_from_env_vars(slurm_cluster, tmp_path, stub_trainer_env):
    dry = slurm_cluster.run("bash", str(SUBMIT_SCRIPT), "experiment=roberta_base",
                            env={**slurm_cluster.env, "DRY_RUN": "1", "NODES": "4", "GPUS_PER_NODE": "8"})
    assert "--nodes=4 --ntasks-per-node=8 --gres=gpu:8" in dry.stderr
    assert dry.stderr.rstrip().endswith("train_multinode.sbatch experiment=roberta_base")
    # For real, on the local cluster: GPUS_PER_NODE=0 gives a 2-rank CPU job with the 1-node template.
    env = {**slurm_cluster.env, **stub_trainer_env, "STUB_EXIT": "0", "GPUS_PER_NODE": "0", "JOB_NAME": "viasubmit"}
    out = slurm_cluster.run("bash", str(SUBMIT_SCRIPT), "trainer.max_steps=3", env=env, cwd=tmp_path)
    job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    slurm_cluster.wait_for_state(job, "COMPLETED", timeout=120)
    args = read_args(tmp_path / "runs" / "viasubmit", 1, 0)
    assert "trainer.accelerator=cpu" in args and args[-1] == "trainer.max_steps=3"
