"""Drive the real Slurm cluster of `launch/slurm/local_cluster.sh` (one node, or N slurmd on this host) from pytest.

Any test module can reuse the cluster by importing the fixture and the helpers::

    from slurm_helpers import slurm_cluster  # noqa: F401  (pytest finds the fixture by name)

    @pytest.mark.slow
    def test_something(slurm_cluster, tmp_path):
        job = slurm_cluster.submit(script, "--ntasks=2", cwd=tmp_path)
        info = slurm_cluster.wait_for_state(job, "COMPLETED", timeout=60)

Each module that uses the fixture gets its own cluster (own state dir under pytest's tmp dir, own
free ports, own range of job ids), started once for the module and stopped at its teardown. Starting
takes about a second once the packages are installed, and separate clusters cannot trip over each other
when two pytest sessions run on one machine. `start_cluster(dir, nodes=2)` starts a 2-node one.

Waiting is always for an event (a job state, a file a job writes), with timeouts sized for a loaded
2-core machine; nothing here sleeps for a fixed time and hopes.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import lightning.pytorch as pl
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "launch" / "slurm" / "local_cluster.sh"
TEMPLATE_1NODE = REPO_ROOT / "launch" / "slurm" / "train_1node.sbatch"
TEMPLATE_MULTINODE = REPO_ROOT / "launch" / "slurm" / "train_multinode.sbatch"
SUBMIT_SCRIPT = REPO_ROOT / "launch" / "slurm" / "submit.sh"
# sbatch flags that turn the GPU templates into a 2-rank CPU (gloo) job on the local cluster.
CPU_SBATCH_ARGS = ("--gres=none", "--ntasks-per-node=2")

# Job states after which a job will not run again by itself.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)

T = TypeVar("T")


class SlurmTimeout(AssertionError):
    """A job or the cluster did not reach the awaited state in time (message carries the evidence)."""


def free_port() -> int:
    """Return a TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """Return the first of `n` consecutive TCP ports that were free a moment ago."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        try:
            for port in range(base + 1, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def run_seconds(record: dict[str, str]) -> int:
    """`RunTime` of a `scontrol show job` record (`[D-]HH:MM:SS`) in seconds."""
    days, _, hms = record["RunTime"].rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def job_log(run_dir: str | os.PathLike, job_name: str, job_id: str) -> Path:
    """Where the templates write a job's log: `<run_dir>/logs/<job name>-<job id>.out` (all restarts)."""
    return Path(run_dir) / "logs" / f"{job_name}-{job_id}.out"


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    Args:
        predicate: called repeatedly; its first truthy result is returned.
        timeout: seconds before giving up.
        what: describes the awaited condition for the error message.
        interval: seconds between polls.

    Raises:
        SlurmTimeout: when `timeout` passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SlurmTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one `scontrol show ... -o` line (`Key=Value Key=Value ...`) into a dict.

    Values may themselves contain spaces (e.g. a Command with arguments); a token without `=` is
    glued onto the previous value.
    """
    record: dict[str, str] = {}
    last = None
    for token in line.strip().split(" "):
        key, sep, value = token.partition("=")
        if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_:/]*", key):
            record[key] = value
            last = key
        elif last is not None:
            record[last] += " " + token
    return record


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """Read an environment dump written inside a job, by `env -0 > FILE` (preferred) or `env > FILE`.

    Returns:
        The variables as a dict. With plain `env`, multi-line values are cut at their first line.
    """
    data = Path(path).read_bytes().decode()
    entries = data.split("\0") if "\0" in data else data.splitlines()
    env = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if sep and key:
            env[key] = value
    return env


def write_job_script(path: str | os.PathLike, body: str) -> Path:
    """Write an executable bash batch script (`#!/bin/bash` + `set -euo pipefail` + body)."""
    path = Path(path)
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body.lstrip("\n"))
    path.chmod(0o755)
    return path


@dataclass
class SlurmCluster:
    """Handle on a running local cluster: where its state lives and how to talk to it.

    Attributes:
        state_dir: the cluster's state dir (config, logs, spool).
        env: environment for clients and jobs; `SLURM_CONF` points at this cluster's config, and
            sbatch copies it into every job so `srun` inside a job finds the same cluster.
    """

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    # -- running commands -------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (or the cluster script) against this cluster; return its result."""
        proc = subprocess.run(
            list(args), env=kw.pop("env", self.env), capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=timeout, **kw,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`{shlex.join(args)}` exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
                f"\n{self.logs_tail()}"
            )
        return proc

    def script(self, command: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run `local_cluster.sh COMMAND` for this cluster's state dir and ports."""
        return self.run("bash", str(CLUSTER_SCRIPT), command, check=check, timeout=timeout)

    def stop(self) -> None:
        self.script("stop", check=False, timeout=120)

    # -- jobs -------------------------------------------------------------------------------------

    def submit(
        self, script: str | os.PathLike, *sbatch_args: str, script_args: Iterable[str] = (),
        cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
    ) -> str:
        """`sbatch --parsable [sbatch_args] SCRIPT [script_args]`; return the job id.

        Args:
            script: the batch script.
            sbatch_args: options for sbatch (`--ntasks=2`, `--output=...`); they override the
                script's `#SBATCH` lines.
            script_args: arguments passed to the script itself (`$@` inside it).
            cwd: submit directory (the job's working directory and default output location).
            env: extra variables for the job on top of `self.env` (sbatch exports the submit env).
        """
        job_env = {**self.env, **(env or {})}
        out = self.run("sbatch", "--parsable", *sbatch_args, str(script), *script_args, cwd=cwd, env=job_env)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o JOB` as a dict (e.g. `JobState`, `Restarts`, `ExitCode`, `StdOut`).

        Finished jobs stay visible for MinJobAge (600 s on the local cluster).
        """
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return parse_scontrol_record(out.stdout.splitlines()[0])

    def state(self, job_id: str) -> str:
        """The job's state word, e.g. `PENDING`, `RUNNING`, `COMPLETED` (flags such as `+` removed)."""
        return self.job(job_id)["JobState"].rstrip("+")

    def wait_for_state(
        self, job_id: str, states: str | Iterable[str], timeout: float = 60, fail_on_final: bool = True,
    ) -> dict[str, str]:
        """Wait until the job is in one of `states`; return its `scontrol show job` record.

        Args:
            states: one state or several (`"RUNNING"`, `{"COMPLETED", "FAILED"}`).
            timeout: seconds.
            fail_on_final: fail at once when the job reaches a final state that is not awaited
                (e.g. FAILED while waiting for COMPLETED) instead of waiting out the timeout.

        Raises:
            SlurmTimeout: with the job record, the head of its stdout and the daemon logs.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        seen: dict[str, str] = {}

        def reached():
            nonlocal seen
            seen = self.job(job_id)
            state = seen["JobState"].rstrip("+")
            if state in wanted:
                return seen
            if fail_on_final and state in FINAL_STATES:
                raise SlurmTimeout(f"job {job_id} ended {state}, expected {sorted(wanted)}\n{self.describe(job_id, seen)}")
            return None

        try:
            return wait_until(reached, timeout, f"job {job_id} to reach {sorted(wanted)}")
        except SlurmTimeout as err:
            if "ended" in str(err):
                raise
            raise SlurmTimeout(f"{err}\n{self.describe(job_id, seen)}") from None

    def wait_for_files(self, job_id: str, paths: Iterable[str | os.PathLike], timeout: float, what: str,
                       log: str | os.PathLike | None = None) -> None:
        """Wait until every file in `paths` exists (files a job writes when it reaches a point).

        Fails at once, with the job's record and log, if the job ends first (e.g. a task crashed at
        start-up) instead of waiting out the timeout.
        """
        paths = [Path(p) for p in paths]
        record: dict[str, str] = {}

        def arrived():
            nonlocal record
            if all(p.exists() for p in paths):
                return True
            record = self.job(job_id)
            if record["JobState"].rstrip("+") in FINAL_STATES:
                raise SlurmTimeout(f"job {job_id} ended {record['JobState']} before {what}\n"
                                   f"{self.describe(job_id, record, log)}")
            return False

        try:
            wait_until(arrived, timeout, what)
        except SlurmTimeout as err:
            if "ended" in str(err):
                raise
            raise SlurmTimeout(f"{err}\n{self.describe(job_id, record, log)}") from None

    def requeue(self, job_id: str) -> None:
        """`scontrol requeue JOB`: kill the running job and queue it again with the same id.

        It restarts after the config's cred_expire (10 s on the local cluster) with
        `SLURM_RESTART_COUNT` incremented.
        """
        self.run("scontrol", "requeue", job_id)

    def bring_signal_near(self, job_id: str) -> None:
        """Shorten a running job's time limit so that its `--signal=SIG@90` is sent at slurmctld's next
        time-limit check (every 30 s; it sends when the end is within sig_time + 30 s): TimeLimit =
        elapsed + 1..2 min. Call it once the job's tasks handle the signal; until then a long --time
        keeps the signal away, so it can neither be lost (no step yet) nor kill an unprepared task."""
        limit = run_seconds(self.job(job_id)) // 60 + 2
        self.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}")

    def push_limit_back_after_requeue(self, job_id: str, minutes: int, timeout: float = 120) -> None:
        """After :meth:`bring_signal_near`: wait for the requeue (Restarts=1; the job then pends for
        cred_expire, 10 s) and give the restart a long limit again, so the same near limit does not
        signal the restart while it starts (SIGUSR1 before the trainer's handler kills a task)."""
        wait_until(lambda: self.job(job_id).get("Restarts", "0") != "0", timeout, f"job {job_id} to be requeued")
        self.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id, check=False)

    def describe(self, job_id: str, record: dict[str, str] | None = None, log: str | os.PathLike | None = None) -> str:
        """Everything useful for a failure message about a job: record, output tail, daemon logs.

        Args:
            log: the job's log when it is not Slurm's StdOut (the templates write `job_log(...)`).
        """
        record = record or {}
        lines = [f"job {job_id}: " + " ".join(f"{k}={record.get(k)}" for k in
                 ("JobState", "Reason", "ExitCode", "Restarts", "BatchHost", "NodeList", "RunTime", "StdOut"))]
        for out in (record.get("StdOut"), log):
            if out and Path(out).is_file():
                lines.append(f"----- {out} (last 60 lines) -----")
                lines += Path(out).read_text(errors="replace").splitlines()[-60:]
        lines.append(self.logs_tail())
        return "\n".join(lines)

    # -- cluster ----------------------------------------------------------------------------------

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-o", "%T").stdout.strip()

    def nodes(self) -> dict[str, str]:
        """Node name -> state, e.g. `{"vm-n1": "idle", "vm-n2": "idle"}`."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def logs_tail(self, lines: int = 25) -> str:
        """The last lines of the slurmctld, slurmd and munged logs."""
        parts = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {log} (last {lines} lines) -----\n" + "\n".join(tail))
        return "\n".join(parts)


def start_cluster(state_dir: str | os.PathLike, ctld_port: int | None = None, slurmd_port: int | None = None,
                  timeout: float = 600, nodes: int = 1) -> SlurmCluster:
    """Start (installing Slurm with apt if missing) a local cluster whose state lives in `state_dir`.

    Args:
        state_dir: created if needed; `ROBERTA_PL_SLURM_DIR` for the script.
        ctld_port, slurmd_port: TCP ports (node i uses slurmd_port + i); free ones are picked when None.
        timeout: seconds for the whole start, apt install included.
        nodes: slurmd daemons (nodes) on this host; named `<host>-n1..` when more than one.

    Returns:
        A handle whose `env` points clients at the cluster.
    """
    state_dir = Path(state_dir)
    ctld_port = ctld_port or free_port()
    while not slurmd_port or ctld_port in range(slurmd_port, slurmd_port + nodes):
        slurmd_port = free_port_range(nodes)
    env = {
        **os.environ,
        "ROBERTA_PL_SLURM_DIR": str(state_dir),
        "ROBERTA_PL_SLURMCTLD_PORT": str(ctld_port),
        "ROBERTA_PL_SLURMD_PORT": str(slurmd_port),
        "ROBERTA_PL_SLURM_NODES": str(nodes),
        # The templates derive MASTER_PORT from the job id: clusters of concurrent test sessions start
        # their job ids far apart, so their jobs do not pick the same port.
        "ROBERTA_PL_SLURM_FIRST_JOB_ID": str(random.randrange(1, 9000) * 1000 + 1),
        "SLURM_CONF": str(state_dir / "slurm.conf"),
    }
    # Variables from an enclosing Slurm job would leak into sbatch/srun and confuse them; so would a rendezvous
    # left in this process's environment by an earlier in-process run (the templates honour a MASTER_PORT set
    # by the user).
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
    for key in [k for k in env if (k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF")
                or k in rendezvous]:
        del env[key]
    cluster = SlurmCluster(state_dir=state_dir, env=env)
    cluster.script("start", timeout=timeout)
    return cluster


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """A running local Slurm cluster for the module; stopped (jobs cancelled) at teardown."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


class PauseAtStep(pl.Callback):
    """A test callback for `trainer.callbacks`: on the first run of a Slurm job (no restart yet), every rank
    stops at optimizer step `step`, writes `<marker>.rank<N>`, and waits until Slurm signals it: SIGTERM
    (`scontrol requeue`, `scancel`; Lightning's handling then ends the run) or the template's SIGUSR1 (seen
    as a callback's `signalled` flag, i.e. the trainer's `RequeueOnSignal`). Then training goes on.

    A test waits for the markers and then requeues: the job is provably mid-run, between known steps,
    however fast or slow the machine is. Restarts (`SLURM_RESTART_COUNT` >= 1) run through.
    It waits at the start of a batch, outside any collective, so every rank can take its SIGTERM.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step < self.step or int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0) > 0:
            return
        Path(f"{self.marker}.rank{trainer.global_rank}").write_text(f"{trainer.global_step}\n")
        while not (trainer.received_sigterm or any(getattr(c, "signalled", False) for c in trainer.callbacks)):
            time.sleep(0.2)  # (a SIGKILL, KillWait seconds after a SIGTERM that was not seen, also ends it)


def pause_override(step: int, marker: str | os.PathLike) -> str:
    """The Hydra override that adds :class:`PauseAtStep` (the job needs `tests/helpers/` on its PYTHONPATH)."""
    return f"trainer.callbacks=[{{_target_: slurm_helpers.PauseAtStep, step: {step}, marker: '{marker}'}}]"


TESTS_DIR = Path(__file__).resolve().parent
