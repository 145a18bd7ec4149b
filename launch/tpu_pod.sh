#!/usr/bin/env bash
# Run varft on a Cloud TPU pod slice: create the TPU VM, ship this repo to every worker, run the
# same command on all workers at once (`--worker=all`), copy the workers' logs back.
#
# Usage:
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --config experiments/<x>.py[:arg] --workdir DIR
#                     [options] [-- extra flags for varft.main]
#
# Options:
#   --tpu NAME           TPU VM name                                        (required)
#   --zone ZONE          e.g. us-central2-b                                 (required)
#   --config PATH[:ARG]  experiment config, relative to the repo root       (required)
#   --workdir DIR        checkpoint/metrics dir every worker can reach, e.g. gs://bucket/run1
#                        (required; a local path would split the run across worker disks)
#   --project ID         GCP project (default: gcloud's configured project)
#   --create             create the TPU VM first (needs --accelerator and --version)
#   --accelerator TYPE   e.g. v4-32, v5litepod-16
#   --version VERSION    TPU software version, e.g. tpu-ubuntu2204-base
#   --spot               create a spot TPU VM
#   --setup              copy the repo to ~/varft on all workers, pip install it with jax[tpu] and the
#                        optional parts the config needs (python -m varft.main --action=requirements)
#   --logs DIR           where worker logs are copied back (default: ./tpu_logs/NAME)
#   --delete             delete the TPU VM when the run ends
#   --dry-run            print the gcloud commands instead of running them
#   -h, --help           show this help
#
# jax.distributed: on TPU VMs `jax.distributed.initialize()` finds the coordinator, process count
# and process id from the TPU metadata, so no addresses are passed; every worker runs the same
# command with `--config.distributed=True`, so `varft.main` initialises the distributed runtime
# before building the mesh.
#
# Example:
#   launch/tpu_pod.sh --tpu varft-v4-32 --zone us-central2-b --create --accelerator v4-32 \
#     --version tpu-ubuntu2204-base --setup --config experiments/coding.py:7b \
#     --workdir gs://my-bucket/varft/coding7b
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; echo >&2; usage >&2; exit 2; }
need() { [[ $# -ge 2 ]] || die "$1 needs a value"; }

TPU="" ZONE="" CONFIG="" WORKDIR="" PROJECT="" ACCEL="" VERSION="" LOGS=""
CREATE=0 SPOT=0 SETUP=0 DELETE=0 DRY_RUN=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need "$@"; TPU="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator) need "$@"; ACCEL="$2"; shift 2 ;;
    --version) need "$@"; VERSION="$2"; shift 2 ;;
    --logs) need "$@"; LOGS="$2"; shift 2 ;;
    --create) CREATE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --setup) SETUP=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n "$TPU" ]] || die "missing --tpu"
[[ -n "$ZONE" ]] || die "missing --zone"
[[ -n "$CONFIG" ]] || die "missing --config"
[[ -n "$WORKDIR" ]] || die "missing --workdir"
if [[ $CREATE -eq 1 ]]; then
  [[ -n "$ACCEL" ]] || die "--create needs --accelerator"
  [[ -n "$VERSION" ]] || die "--create needs --version"
fi
LOGS="${LOGS:-./tpu_logs/$TPU}"
CONFIG_FLAGS=""
for flag in "${EXTRA[@]}"; do CONFIG_FLAGS+=" $(printf '%q' "$flag")"; done
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"

run() {
  if [[ $DRY_RUN -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

if [[ $CREATE -eq 1 ]]; then
  CREATE_CMD=("${GCLOUD[@]}" create "$TPU" "${COMMON[@]}" --accelerator-type="$ACCEL"
              --version="$VERSION")
  [[ $SPOT -eq 1 ]] && CREATE_CMD+=(--spot)
  run "${CREATE_CMD[@]}"
fi

if [[ $SETUP -eq 1 ]]; then
  TARBALL="${TMPDIR:-/tmp}/varft_src_$TPU.tar.gz"
  run tar -czf "$TARBALL" -C "$REPO_ROOT" --exclude=.git --exclude='*.pyc' --exclude=tpu_logs .
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:~/varft_src.tar.gz" "${COMMON[@]}" --worker=all
  # varft, then the optional parts this config needs (`--action=requirements`: one pip install a line).
  SETUP_CMD='mkdir -p ~/varft && tar -xzf ~/varft_src.tar.gz -C ~/varft && cd ~/varft && '
  SETUP_CMD+='python3 -m pip install -q -U "jax[tpu]" && python3 -m pip install -q -e ~/varft && '
  SETUP_CMD+="python3 -m varft.main --action=requirements --config=$(printf '%q' "$CONFIG")$CONFIG_FLAGS"
  SETUP_CMD+=' | while read -r args; do python3 -m pip install -q $args || exit 1; done'
  run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all --command="$SETUP_CMD"
fi

# The start-up check (config, installed parts) runs on every worker before the distributed job starts.
REMOTE_RUN="set -o pipefail; cd ~/varft && mkdir -p ~/varft_logs && "
REMOTE_RUN+="python3 -m varft.main --action=check --config=$(printf '%q' "$CONFIG")$CONFIG_FLAGS && python3 -m varft.main"
REMOTE_RUN+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
REMOTE_RUN+=" --config.distributed=True$CONFIG_FLAGS"
REMOTE_RUN+=' 2>&1 | tee ~/varft_logs/$(hostname).log'
STATUS=0
run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all --command="$REMOTE_RUN" || STATUS=$?

run mkdir -p "$LOGS"
run "${GCLOUD[@]}" scp --recurse "$TPU:~/varft_logs" "$LOGS" "${COMMON[@]}" --worker=all || true

if [[ $DELETE -eq 1 ]]; then
  run "${GCLOUD[@]}" delete "$TPU" "${COMMON[@]}" --quiet
fi
exit "$STATUS"
