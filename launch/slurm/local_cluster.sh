#!/usr/bin/env bash
# local_cluster.sh — a throwaway Slurm cluster on this machine, for tests and development.
#
# It is a real Slurm (slurmctld + slurmd + munge from the Debian packages), not a mock, so the sbatch
# templates in this folder can be exercised end to end: submit, multi-task steps, requeue, resume.
# One node by default; ROBERTA_PL_SLURM_NODES=N starts N slurmd daemons on this host (Debian builds
# slurmd with MULTIPLE_SLURMD: `slurmd -N <node>`, one port each, all on 127.0.0.1), so multi-node
# jobs run here too.
# Everything it writes (config, munge key and socket, state, spool, logs, pid files) lives under one
# state directory, so it never touches a system-wide Slurm or munge install.
#
#   launch/slurm/local_cluster.sh start    # install (apt, only if missing) + start; waits for `idle`
#   ROBERTA_PL_SLURM_NODES=2 launch/slurm/local_cluster.sh start   # two nodes (two slurmd) on this host
#   eval "$(launch/slurm/local_cluster.sh env)"   # point sbatch/squeue/... at it (sets SLURM_CONF)
#   launch/slurm/local_cluster.sh status   # sinfo + squeue
#   launch/slurm/local_cluster.sh stop     # cancel jobs, stop slurmd, slurmctld, munged
#
# Assumptions: Debian/Ubuntu, run as root (slurmd must be able to run jobs as any user; as root it
# runs them as root). No systemd is needed: the daemons are started directly.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") start|stop|status|env|--help

  start    install slurm + munge with apt if missing, write a config, start munged, slurmctld and
           one slurmd per node, and wait until every node is idle. Idempotent: if the cluster
           already answers, it only reports.
  stop     cancel all jobs, then stop the slurmd(s), slurmctld and munged (state dir is kept for
           its logs).
  status   print sinfo and squeue (exit 1 if the controller does not answer).
  env      print 'export SLURM_CONF=...' for eval in a shell.

Environment (all optional):
  ROBERTA_PL_SLURM_DIR            state dir (config, logs, spool)   [/tmp/roberta-pl-slurm]
  ROBERTA_PL_SLURM_TIMEOUT        seconds to wait for the node      [60]
  ROBERTA_PL_SLURMCTLD_PORT       slurmctld port                    [6817]
  ROBERTA_PL_SLURMD_PORT          slurmd port; node i of N uses PORT+i-1   [6818]
  ROBERTA_PL_SLURM_NODES          number of nodes (slurmd daemons)  [1]
  ROBERTA_PL_SLURM_FIRST_JOB_ID   first job id (templates derive MASTER_PORT from the id)   [1]

With one node, the node is named after this host (\`hostname -s\`). With N > 1 the nodes are
<host>-n1 .. <host>-nN: names that resolve to nothing, as on a cluster whose node names are not in
DNS; Slurm reaches each at NodeAddr=127.0.0.1 on its own port.

Clients find the cluster through SLURM_CONF=<state dir>/slurm.conf. sbatch copies the submitting
environment into the job (--export=ALL is the default), so srun inside a job finds it too.
EOF
}

STATE_DIR=${ROBERTA_PL_SLURM_DIR:-/tmp/roberta-pl-slurm}
TIMEOUT=${ROBERTA_PL_SLURM_TIMEOUT:-60}
CTLD_PORT=${ROBERTA_PL_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${ROBERTA_PL_SLURMD_PORT:-6818}
NUM_NODES=${ROBERTA_PL_SLURM_NODES:-1}
FIRST_JOB_ID=${ROBERTA_PL_SLURM_FIRST_JOB_ID:-1}

CONF="$STATE_DIR/slurm.conf"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
LOG_DIR="$STATE_DIR/log"
RUN_DIR="$STATE_DIR/run"
HOST=$(hostname -s)
if [[ ! $NUM_NODES =~ ^[1-9][0-9]*$ ]]; then
    echo "[local_cluster] ROBERTA_PL_SLURM_NODES=$NUM_NODES: expected a number >= 1" >&2
    exit 2
fi
# NODES: the node names, one slurmd each.
if ((NUM_NODES == 1)); then
    NODES=("$HOST")
else
    NODES=()
    for ((i = 1; i <= NUM_NODES; i++)); do NODES+=("$HOST-n$i"); done
fi

# Every slurm client and daemon started from here reads this config, not /etc/slurm/slurm.conf.
export SLURM_CONF="$CONF"

log() { echo "[local_cluster] $*" >&2; }

# --- install ---------------------------------------------------------------------------------------

# The Debian packages that provide the binaries we call. apt is touched only when one is missing, so a
# second `start` costs nothing here.
ensure_installed() {
    local missing=0 bin
    for bin in munged slurmctld slurmd sbatch srun scontrol sinfo squeue; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        log "slurm/munge are missing and installing them needs root (apt-get)."
        exit 1
    fi
    local pkgs=(munge slurmctld slurmd slurm-client)
    log "installing ${pkgs[*]} with apt-get (first run only) ..."
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have empty package lists: try once as is, then update and retry.
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" </dev/null >"/tmp/roberta-pl-slurm-apt.log" 2>&1; then
        apt-get update -q </dev/null >>"/tmp/roberta-pl-slurm-apt.log" 2>&1
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" </dev/null >>"/tmp/roberta-pl-slurm-apt.log" 2>&1 || {
            tail -n 30 /tmp/roberta-pl-slurm-apt.log >&2
            log "apt-get install failed (full log: /tmp/roberta-pl-slurm-apt.log)"
            exit 1
        }
    fi
}

# --- process helpers -------------------------------------------------------------------------------

# pid_alive FILE: true when FILE holds the pid of a live process.
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

# stop_pidfile NAME FILE: SIGTERM the process in FILE, wait up to 10 s, then SIGKILL it.
stop_pidfile() {
    local name=$1 file=$2 pid i
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(<"$file")
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
        sleep 0.1
    done
    log "$name did not exit after SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
}

# slurmd_pidfile NODE: where that node's slurmd writes its pid (SlurmdPidFile, with %n expanded).
slurmd_pidfile() {
    if ((NUM_NODES == 1)); then echo "$RUN_DIR/slurmd.pid"; else echo "$RUN_DIR/slurmd-$1.pid"; fi
}

# `|| true`: while the controller is still starting sinfo fails, which must not end the script (set -e).
node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | head -n1 || true; }

# Print the end of every log, so a failure explains itself in CI output.
dump_logs() {
    local f
    for f in "$LOG_DIR"/*.log; do
        [[ -f $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

die_with_logs() {
    log "ERROR: $*"
    dump_logs
    # Leave nothing half-started behind (a failed CI run must not leak daemons holding the ports).
    cmd_stop >/dev/null 2>&1 || true
    log "ERROR: $* (logs kept in $LOG_DIR)"
    exit 1
}

cluster_running() {
    local node
    pid_alive "$MUNGE_DIR/munged.pid" && pid_alive "$RUN_DIR/slurmctld.pid" || return 1
    for node in "${NODES[@]}"; do pid_alive "$(slurmd_pidfile "$node")" || return 1; done
    scontrol ping >/dev/null 2>&1
}

# --- config ----------------------------------------------------------------------------------------

write_config() {
    # `slurmd -C` prints this machine's real NodeName/CPUs/Sockets/Cores/Threads/RealMemory line.
    # We keep its hardware fields so slurmd's registration matches exactly (a node whose config claims
    # more than it has is drained as "Low RealMemory"/"Low socket*core*thread count").
    local hw
    hw=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //')
    local cpus mem
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    # Memory is a consumable resource (CR_Core_Memory), so a job that asks nothing gets an even share
    # per CPU; a 2-CPU job gets the whole node, and `--mem` works as on a real cluster.
    local def_mem=$((mem / cpus))

    # One node: today's layout. Several: one slurmd per node on this host, each with its own port,
    # spool, pid and log file (%n = the node name, expanded by each slurmd).
    local node_lines="" i node per_node_paths
    if ((NUM_NODES == 1)); then
        node_lines="NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST $hw State=UNKNOWN"
        per_node_paths="SlurmdSpoolDir=$STATE_DIR/spool
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmdLogFile=$LOG_DIR/slurmd.log"
    else
        # Every node reports this machine's hardware (they share it); jobs on different nodes share cores.
        for ((i = 0; i < NUM_NODES; i++)); do
            node=${NODES[i]}
            node_lines+="NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$((SLURMD_PORT + i)) $hw State=UNKNOWN"$'\n'
        done
        node_lines=${node_lines%$'\n'}
        per_node_paths="SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log"
    fi
    local node_list
    node_list=$(IFS=,; echo "${NODES[*]}")

    cat >"$CONF" <<EOF
# Generated by launch/slurm/local_cluster.sh — do not edit, \`start\` rewrites it.
ClusterName=roberta-pl-local
# This host both controls and computes. NodeAddr=127.0.0.1 avoids depending on how (or whether) the
# node names resolve on this machine.
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

# munge auth, through our own munged socket (not /run/munge), so no system daemon is needed.
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job must wait before it may start again (default 120 s);
# 10 s keeps requeue tests fast while leaving step launches on a busy 2-core box plenty of slack.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

# Works as root without cgroups or systemd: track processes by walking /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none

# The main scheduler loop runs every 60 s by default, and nothing else wakes it when a requeued job's
# BeginTime passes; on a one-node test cluster a 1 s loop costs nothing and removes that wait.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1

# Requeue: 'scontrol requeue' and Lightning's SIGUSR1 auto-requeue both need jobs to be requeueable.
JobRequeue=1
# A node that was DOWN (e.g. slurmd restarted) comes back by itself once slurmd registers.
ReturnToService=2
# Job ids start here (default 1). The templates derive MASTER_PORT from the job id, so two test
# clusters on one machine get different first ids and their jobs do not pick the same port.
FirstJobId=$FIRST_JOB_ID
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued (default 30): a requeued
# job restarts this much sooner; real clusters keep the default.
KillWait=5
# Keep finished jobs visible to 'scontrol show job' for 10 min (there is no accounting DB for sacct).
MinJobAge=600

StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
$per_node_paths
SlurmctldDebug=info
MailProg=/bin/true
SlurmdDebug=info

$node_lines
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
EOF
}

# --- commands --------------------------------------------------------------------------------------

start_munge() {
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        # A fresh random key per state dir: only daemons and clients of this cluster share it.
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chmod 0400 "$MUNGE_DIR/munge.key"
    fi
    # --force: accept a stale socket left by a killed munged, and a state dir under /tmp.
    munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" || die_with_logs "munged failed to start"
    # Prove the key/socket pair works before slurm depends on it.
    munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null ||
        die_with_logs "munge round trip failed"
}

cmd_start() {
    ensure_installed
    if cluster_running; then
        log "already running (SLURM_CONF=$CONF)"
        cmd_env
        return 0
    fi
    # Something half-started (or stale pid files from a killed run): clean it up first.
    cmd_stop >/dev/null 2>&1 || true

    log "starting a $NUM_NODES-node cluster in $STATE_DIR (node(s) ${NODES[*]})"
    mkdir -p "$STATE_DIR" "$MUNGE_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    local node
    if ((NUM_NODES > 1)); then
        for node in "${NODES[@]}"; do mkdir -p "$STATE_DIR/spool/$node"; done
    fi
    chmod 0755 "$MUNGE_DIR"
    # Fresh logs per start, so the tail printed on a failure is about this start.
    rm -f "$LOG_DIR"/*.log
    write_config
    start_munge

    # -c: clean start, forget jobs from an earlier run of this test cluster.
    slurmctld -c -f "$CONF" || die_with_logs "slurmctld failed to start"
    for node in "${NODES[@]}"; do
        slurmd -f "$CONF" -N "$node" || die_with_logs "slurmd for node $node failed to start"
    done

    local deadline=$((SECONDS + TIMEOUT)) state="" pidfile
    for node in "${NODES[@]}"; do
        pidfile=$(slurmd_pidfile "$node")
        while ((SECONDS < deadline)); do
            state=$(node_state "$node")
            [[ $state == idle ]] && break
            # A daemon that died (bad config, port in use) will not come back: fail now, with its log.
            pid_alive "$RUN_DIR/slurmctld.pid" || { sleep 0.5; pid_alive "$RUN_DIR/slurmctld.pid"; } ||
                die_with_logs "slurmctld is not running"
            pid_alive "$pidfile" || { sleep 0.5; pid_alive "$pidfile"; } ||
                die_with_logs "slurmd of node $node is not running"
            # A node registered before the controller cleared it can sit in down/drain: bring it back.
            if [[ $state == down* || $state == drain* ]]; then
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
            fi
            sleep 0.5
        done
        [[ $state == idle ]] || die_with_logs "node $node not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
    done
    log "node(s) ${NODES[*]} idle"
    cmd_env
}

cmd_stop() {
    if pid_alive "$RUN_DIR/slurmctld.pid" && scontrol ping >/dev/null 2>&1; then
        # Jobs left running would keep slurmstepd processes (and their children) alive after the
        # daemons are gone.
        scancel --quiet "--user=$(id -un)" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    local pidfile
    # Every slurmd this state dir has run, whatever NODES is now (a cluster started with more nodes).
    for pidfile in "$RUN_DIR"/slurmd.pid "$RUN_DIR"/slurmd-*.pid; do
        [[ -e $pidfile ]] && stop_pidfile "slurmd ($(basename "$pidfile" .pid))" "$pidfile"
    done
    stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
    stop_pidfile munged "$MUNGE_DIR/munged.pid"
    log "stopped"
}

cmd_status() {
    # Check the pid file first: a client with no reachable controller retries for up to a minute.
    if ! pid_alive "$RUN_DIR/slurmctld.pid" || ! scontrol ping >/dev/null 2>&1; then
        log "not running (no controller answers for SLURM_CONF=$CONF)"
        return 1
    fi
    sinfo
    squeue
}

cmd_env() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
