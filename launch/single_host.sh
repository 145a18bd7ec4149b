#!/usr/bin/env bash
# Train or evaluate varft on one machine (CPU, one GPU box, or a single TPU VM).
#
# Usage:
#   launch/single_host.sh --config experiments/<x>.py[:arg] --workdir DIR [options] [-- extra flags]
#
# Options:
#   --config PATH[:ARG]  experiment config file and its argument (e.g. experiments/coding.py:demo)
#   --workdir DIR        where checkpoints, metrics, rollouts and eval tables go
#   --python BIN         Python interpreter (default: python3, or $PYTHON)
#   --dry-run            print the command instead of running it
#   -h, --help           show this help
# Everything after `--` is passed to varft.main unchanged, e.g. `-- --config.mode=eval`.
#
# Example:
#   launch/single_host.sh --config experiments/search.py:demo --workdir /tmp/varft_demo
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; echo >&2; usage >&2; exit 2; }

CONFIG="" WORKDIR="" PYTHON_BIN="${PYTHON:-python3}" DRY_RUN=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) [[ $# -ge 2 ]] || die "--config needs a value"; CONFIG="$2"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --workdir) [[ $# -ge 2 ]] || die "--workdir needs a value"; WORKDIR="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON_BIN="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "missing --config"
[[ -n "$WORKDIR" ]] || die "missing --workdir"

CMD=("$PYTHON_BIN" -m varft.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
if [[ $DRY_RUN -eq 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
cd "$(dirname "$0")/.."
# The optional parts this config needs (one pip install a line), then the start-up check, then the run.
"$PYTHON_BIN" -m varft.main --action=requirements "--config=$CONFIG" "${EXTRA[@]}" |
  while read -r args; do "$PYTHON_BIN" -m pip install -q $args; done
"$PYTHON_BIN" -m varft.main --action=check "--config=$CONFIG" "${EXTRA[@]}"
mkdir -p "$WORKDIR"
exec "${CMD[@]}"
