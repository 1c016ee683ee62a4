#!/usr/bin/env bash
# Runs one NTK-CL config on every worker of a Cloud TPU pod slice: checks out a given commit on each
# worker, installs it with the TPU extra, and starts the same command everywhere under nohup, one
# log per worker. Returns once every worker has started; rerunning the same command resumes.
#
#   experiments/launch_tpu_pod.sh [--dry-run] [--preflight TYPE] [--project P] [--repo URL] \
#       [--dir DIR] <tpu-name> <zone> <commit> <config-with-args> <workdir> [--config.key=value ...]
#   e.g. experiments/launch_tpu_pod.sh my-v4-32 us-central2-b 1a2b3c4 \
#          "experiments/configs/cifar100.py:backbone=in21k" /mnt/shared/runs/cifar_5seeds \
#          --config.seeds=0,1,2,3,4
#
# --dry-run prints every gcloud command (one per line, shell-quoted) instead of running it.
# --preflight TYPE (the slice's accelerator type, e.g. v4-32 or v5litepod-16) first compiles the
# run's config with these overrides for that slice on this machine (`python -m ntkcl_jax.preflight`,
# needs libtpu here, no TPU) before any gcloud call, prints the report, and stops (exit 1, or 2 for
# an unknown type) when a function does not fit. $PYTHON (default python3) runs it.
# --repo (default: this checkout's `origin` URL) is cloned on each worker into --dir (default
# ~/ntkcl-jax) and <commit> checked out; with --repo local, the commit is packed here with
# `git archive` and copied to every worker with `gcloud ... scp --worker=all` instead (workers
# without access to the repository). Each worker installs into --dir/.venv:
#   pip install -r requirements.txt -e ".[tpu]"
# then runs `python -m ntkcl_jax.main --config <config> --workdir <workdir> --multihost
# --config.train.platform=tpu [--config.key=value ...]` under nohup, writing <dir>/logs/worker-<i>.log on worker i
# (fetch them with `gcloud compute tpus tpu-vm ssh <tpu> --worker=<i> --command 'tail ...'`).
#
# The workdir must be one directory all workers see (NFS / Filestore, or a GCS bucket mounted
# with gcsfuse); see README "GPU / TPU". Process 0 writes metrics and summaries; every process
# writes its part of each checkpoint.
set -euo pipefail

DRY_RUN=0 PREFLIGHT="" PROJECT="" REPO="" DIR='~/ntkcl-jax'
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --preflight) PREFLIGHT=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    --*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 5 ]]; then
  echo "usage: $0 [--dry-run] [--preflight TYPE] [--project P] [--repo URL|local] [--dir DIR] <tpu-name> <zone> <commit> <config> <workdir> [--config.key=value ...]" >&2
  exit 2
fi
TPU=$1 ZONE=$2 COMMIT=$3 CONFIG=$4 WORKDIR=$5
OVERRIDES=("${@:6}")
for flag in "${OVERRIDES[@]}"; do
  if ! [[ "$flag" == --config.*=* ]]; then
    echo "error: extra arguments must be config overrides --config.key=value, got '$flag'" >&2
    exit 2
  fi
done
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "$REPO" ]]; then
  REPO=$(git -C "$HERE" remote get-url origin 2>/dev/null || true)
  if [[ -z "$REPO" ]]; then
    echo "error: no 'origin' remote in $HERE; pass --repo URL, or --repo local to copy the commit" >&2
    exit 2
  fi
fi
if ! [[ "$COMMIT" =~ ^[0-9a-fA-F]{7,40}$ ]]; then
  echo "error: <commit> must be a commit hash (7-40 hex digits), got '$COMMIT'" >&2
  exit 2
fi

# 0. Preflight: does the run fit the slice? Compiled here, before anything is booked or started.
if [[ -n "$PREFLIGHT" ]]; then
  echo "preflight: compiling $CONFIG for a $PREFLIGHT slice on this machine" >&2
  status=0
  (cd "$HERE" && "${PYTHON:-python3}" -m ntkcl_jax.preflight --config "$CONFIG" \
    --target "$PREFLIGHT" "${OVERRIDES[@]}") || status=$?
  if [[ $status != 0 ]]; then
    echo "error: preflight for $PREFLIGHT failed (exit $status, report above); nothing was started on $TPU." >&2
    exit "$status"
  fi
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {  # prints the command (dry run) or runs it
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

q() { printf '%q' "$1"; }

# 1. Code on every worker, at exactly <commit>.
if [[ "$REPO" == local ]]; then
  TARBALL="/tmp/ntkcl-jax-$COMMIT.tar.gz"
  if [[ $DRY_RUN == 1 ]]; then
    echo "git -C $(q "$HERE") archive --format=tar.gz -o $(q "$TARBALL") $COMMIT"
  else
    git -C "$HERE" archive --format=tar.gz -o "$TARBALL" "$COMMIT"
  fi
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:/tmp/" --worker=all "${COMMON[@]}"
  FETCH="rm -rf $DIR && mkdir -p $DIR && tar -xzf $(q "$TARBALL") -C $DIR"
else
  FETCH="(test -d $DIR/.git || git clone $(q "$REPO") $DIR) && cd $DIR && git fetch --quiet origin && git checkout --quiet --detach $COMMIT"
fi

# 2. Install with the TPU extra (the same JAX pin as requirements.txt) into a venv.
INSTALL="cd $DIR && python3 -m venv .venv && . .venv/bin/activate && pip install --quiet --upgrade pip && pip install --quiet -r requirements.txt -e '.[tpu]'"
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${COMMON[@]}" --command "set -e; $FETCH && $INSTALL"

# 3. Start the run under nohup on every worker, one log each; the ssh returns once started.
# TPU_WORKER_ID is set on every Cloud TPU VM worker (0 .. n-1).
MAIN="python -m ntkcl_jax.main --config $(q "$CONFIG") --workdir $(q "$WORKDIR") --multihost --config.train.platform=tpu"
for flag in "${OVERRIDES[@]}"; do MAIN+=" $(q "$flag")"; done
START="cd $DIR && . .venv/bin/activate && mkdir -p logs && W=\${TPU_WORKER_ID:-\$(hostname)} && nohup $MAIN > logs/worker-\$W.log 2>&1 < /dev/null & echo started worker \${TPU_WORKER_ID:-\$(hostname)} pid \$!"
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${COMMON[@]}" --command "$START"

if [[ $DRY_RUN == 0 ]]; then
  echo "Started on every worker of $TPU. Logs: $DIR/logs/worker-<i>.log on worker i; workdir $WORKDIR."
fi
