#!/usr/bin/env bash
# submit.sh — size a training job with environment variables and sbatch the right template.
#
# #SBATCH lines cannot read variables, so this turns NODES/GPUS_PER_NODE/... into sbatch flags (which
# win over the templates' #SBATCH defaults), picks train_1node.sbatch or train_multinode.sbatch, prints
# the exact sbatch command, and runs it. Everything it does you can also type as one sbatch line.
#
#   NODES=4 GPUS_PER_NODE=8 JOB_NAME=base-bs8k EXPERIMENT=roberta_base launch/slurm/submit.sh \
#       data.train_shards=/shared/data/shards data.valid_shards=/shared/data/shards data.tokenizer=/shared/data/tokenizer
#   GPUS_PER_NODE=0 launch/slurm/submit.sh trainer.max_steps=50   # CPU, 2 ranks, gloo (local cluster)
#   DRY_RUN=1 NODES=2 launch/slurm/submit.sh                        # print the sbatch command only
#
# Arguments are Hydra overrides for roberta-pl-train. The job also sees the variables read by the
# templates (EXPERIMENT, TRAINER, RUN_DIR, LOGGER, WANDB_MODE): sbatch exports this environment.
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Environment (defaults in brackets):
  NODES               nodes                                             [1]
  GPUS_PER_NODE       GPUs per node = tasks per node; 0 = CPU (gloo)    [8]
  CPU_TASKS_PER_NODE  tasks per node when GPUS_PER_NODE=0               [2]
  JOB_NAME            Slurm job name; the run dir is runs/<JOB_NAME>    [roberta-pl]
  TIME                time limit, e.g. 24:00:00                          [template: 24:00:00]
  PARTITION           Slurm partition                                    [cluster default]
  SBATCH_FLAGS        more sbatch flags, split on spaces (--account=x --qos=y)
  DRY_RUN=1           print the command, do not submit
  EXPERIMENT, TRAINER, RUN_DIR, LOGGER, WANDB_MODE: read by the template inside the job.
EOF
}
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPU_TASKS_PER_NODE=${CPU_TASKS_PER_NODE:-2}
JOB_NAME=${JOB_NAME:-roberta-pl}

if ((NODES == 1)); then
    template=$HERE/train_1node.sbatch
else
    template=$HERE/train_multinode.sbatch
fi
flags=(--job-name="$JOB_NAME" --nodes="$NODES")
if ((GPUS_PER_NODE == 0)); then
    # --gres=none clears the template's --gres=gpu:N; the template then trains on CPU with gloo.
    flags+=(--ntasks-per-node="$CPU_TASKS_PER_NODE" --gres=none)
else
    flags+=(--ntasks-per-node="$GPUS_PER_NODE" --gres="gpu:$GPUS_PER_NODE")
fi
[[ -n ${TIME:-} ]] && flags+=(--time="$TIME")
[[ -n ${PARTITION:-} ]] && flags+=(--partition="$PARTITION")
# shellcheck disable=SC2206  # word splitting of SBATCH_FLAGS is the point
[[ -n ${SBATCH_FLAGS:-} ]] && flags+=($SBATCH_FLAGS)

# The template derives trainer.num_nodes/devices from the allocation; GPUS_PER_NODE tells it CPU vs GPU.
export GPUS_PER_NODE
cmd=(sbatch "${flags[@]}" "$template" "$@")
printf '%q ' "${cmd[@]}" >&2
echo >&2
[[ -n ${DRY_RUN:-} ]] && exit 0
exec "${cmd[@]}"
