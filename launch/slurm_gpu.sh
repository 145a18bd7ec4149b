#!/usr/bin/env bash
# Run varft on several GPU nodes with SLURM: one process per node drives all of that node's GPUs;
# the processes join one JAX runtime through jax.distributed.
#
# Usage (from a login node; submits itself with sbatch):
#   launch/slurm_gpu.sh --nodes N --config experiments/<x>.py[:arg] --workdir DIR [options]
#                       [-- extra flags for varft.main]
# Inside an allocation (SLURM_JOB_ID set, e.g. when sbatch runs this script) it starts the run
# with srun, one task per node.
#
# Options:
#   --nodes N            number of nodes                                    (required to submit)
#   --config PATH[:ARG]  experiment config                                  (required)
#   --workdir DIR        checkpoint/metrics dir on a filesystem all nodes share   (required)
#   --gpus-per-node G    GPUs per node (default 8)
#   --partition P        SLURM partition
#   --time T             time limit, e.g. 24:00:00
#   --account A          SLURM account
#   --port PORT          coordinator port on the first node (default 12355)
#   --python BIN         Python interpreter on the nodes (default python3, or $PYTHON)
#   --logs DIR           sbatch output folder (default: DIR/slurm_logs, DIR = --workdir)
#   --dry-run            print the sbatch / srun command instead of running it
#   -h, --help           show this help
#
# jax.distributed: each task exports JAX_COORDINATOR_ADDRESS (first node of the allocation and
# --port), JAX_NUM_PROCESSES (= nodes) and JAX_PROCESS_ID (= SLURM_PROCID); `varft.main` passes
# them to `jax.distributed.initialize()` before building the mesh.
#
# Example:
#   launch/slurm_gpu.sh --nodes 4 --partition a100 --time 12:00:00 \
#     --config experiments/search.py:7b --workdir /shared/runs/search7b
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; echo >&2; usage >&2; exit 2; }
need() { [[ $# -ge 2 ]] || die "$1 needs a value"; }

NODES="" CONFIG="" WORKDIR="" GPUS=8 PARTITION="" TIME="" ACCOUNT="" PORT=12355
PYTHON_BIN="${PYTHON:-python3}" LOGS="" DRY_RUN=0 EXTRA=()
# The arguments the submitted job gets: all but our own --dry-run.
FORWARD=() AFTER_SEP=0
for arg in "$@"; do
  [[ $AFTER_SEP -eq 0 && "$arg" == --dry-run ]] && continue
  [[ "$arg" == -- ]] && AFTER_SEP=1
  FORWARD+=("$arg")
done
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need "$@"; NODES="$2"; shift 2 ;;
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --gpus-per-node) need "$@"; GPUS="$2"; shift 2 ;;
    --partition) need "$@"; PARTITION="$2"; shift 2 ;;
    --time) need "$@"; TIME="$2"; shift 2 ;;
    --account) need "$@"; ACCOUNT="$2"; shift 2 ;;
    --port) need "$@"; PORT="$2"; shift 2 ;;
    --python) need "$@"; PYTHON_BIN="$2"; shift 2 ;;
    --logs) need "$@"; LOGS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "missing --config"
[[ -n "$WORKDIR" ]] || die "missing --workdir"
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus-per-node must be a number"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"

run() {
  if [[ $DRY_RUN -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Login node: submit this script; inside the job the branch below runs.
  [[ -n "$NODES" ]] || die "missing --nodes"
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number"
  LOGS="${LOGS:-$WORKDIR/slurm_logs}"
  # sbatch runs a copy of this script from its spool dir: tell the job where the repo is.
  SBATCH=(sbatch --job-name=varft --export=ALL,VARFT_REPO="$(cd "$(dirname "$0")/.." && pwd)" --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS"
          --output="$LOGS/%j.out")
  [[ -n "$PARTITION" ]] && SBATCH+=(--partition="$PARTITION")
  [[ -n "$TIME" ]] && SBATCH+=(--time="$TIME")
  [[ -n "$ACCOUNT" ]] && SBATCH+=(--account="$ACCOUNT")
  # Once, on the login node (the nodes share the environment): the config's optional parts and its start-up check.
  if [[ $DRY_RUN -eq 0 ]]; then
    "$PYTHON_BIN" -m varft.main --action=requirements "--config=$CONFIG" "${EXTRA[@]}" |
      while read -r args; do "$PYTHON_BIN" -m pip install -q $args; done
    "$PYTHON_BIN" -m varft.main --action=check "--config=$CONFIG" "${EXTRA[@]}"
  fi
  run mkdir -p "$LOGS"
  run "${SBATCH[@]}" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "${FORWARD[@]}"
  exit 0
fi

# Inside the allocation: the first node hosts the jax.distributed coordinator.
NODELIST="${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
if command -v scontrol >/dev/null 2>&1; then
  HEAD_NODE="$(scontrol show hostnames "$NODELIST" | head -n 1)"
else
  HEAD_NODE="${NODELIST%%,*}"
fi
NUM_PROCESSES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
REPO_ROOT="${VARFT_REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
TASK="cd $(printf '%q' "$REPO_ROOT") && JAX_PROCESS_ID=\$SLURM_PROCID exec $(printf '%q' "$PYTHON_BIN")"
TASK+=" -m varft.main --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
for flag in "${EXTRA[@]}"; do TASK+=" $(printf '%q' "$flag")"; done
run env JAX_COORDINATOR_ADDRESS="$HEAD_NODE:$PORT" JAX_NUM_PROCESSES="$NUM_PROCESSES" \
  srun --nodes="$NUM_PROCESSES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$TASK"
