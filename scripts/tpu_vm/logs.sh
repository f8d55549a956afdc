#!/usr/bin/env bash
# Stream or download the logs that launch.sh writes on the workers.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--run RUN] [--worker W] [--lines N] [--no-follow]
       $PROG --name NAME --zone ZONE --fetch DIR [--run RUN] [--worker W] [--num-workers N]

Stream a run's log (tail -f of ~/$REMOTE_LOGS/RUN.log, each line prefixed
with the worker's host name), or with --fetch copy the logs of every worker
to DIR/worker-I/ with 'gcloud compute tpus tpu-vm scp'.

Options:
  --name NAME          TPU VM name          (env BIGMODEL_TPU_NAME)
  --zone ZONE          zone                 (env BIGMODEL_TPU_ZONE)
  --project PROJECT    GCP project          (env BIGMODEL_TPU_PROJECT)
  --run RUN            run name given by launch.sh; default: the newest log
                       (with --fetch: all logs)
  --worker W           worker(s): an index, a list like 0,2 or 1-3, or 'all'
                       (default: 0 when streaming, all with --fetch)
  --lines N            lines of history to show first (default: 100)
  --no-follow          print the last lines and exit instead of following
  --fetch DIR          download the logs into DIR instead of streaming
  --num-workers N      number of workers, for --fetch; default: asked from
                       'gcloud compute tpus tpu-vm describe'
  --dry-run            print the gcloud commands instead of running them
  -h, --help           show this help

Examples:
  $PROG --name my-tpu --zone us-central2-b --run r1
  $PROG --name my-tpu --zone us-central2-b --run r1 --fetch ./logs
EOF
}

RUN=''
WORKER=''
LINES=100
FOLLOW=1
FETCH_DIR=''
NUM_WORKERS=''

script_opt() {
  case $1 in
    --run) RUN=$2 ;;
    --worker) WORKER=$2 ;;
    --lines) LINES=$2 ;;
    --no-follow) FOLLOW=0 ;;
    --fetch) FETCH_DIR=$2 ;;
    --num-workers) NUM_WORKERS=$2 ;;
    *) return 1 ;;
  esac
}

parse_args "--run --worker --lines --fetch --num-workers" "$@"
require_tpu
no_rest
[[ -z $RUN ]] || check_run_name "$RUN"
check_int --lines "$LINES"
[[ -z $NUM_WORKERS ]] || check_int --num-workers "$NUM_WORKERS"
[[ -z $WORKER || $WORKER =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] || die "bad --worker '$WORKER'"

if [[ -z $FETCH_DIR ]]; then
  # Streaming: the worker-side script gets its settings as variables.
  remote="logs=$REMOTE_LOGS run=$RUN lines=$LINES follow=$FOLLOW; $(
    cat <<'EOF'
cd && cd "$logs" 2>/dev/null || { echo "$(hostname): no logs yet" >&2; exit 1; }
if [ -z "$run" ]; then f=$(ls -t -- *.log 2>/dev/null | head -n 1); else f=$run.log; fi
[ -n "$f" ] && [ -f "$f" ] || { echo "$(hostname): no log ${f:-file}" >&2; exit 1; }
if [ "$follow" = 1 ]; then opt=-F; else opt=; fi
tail -n "$lines" $opt -- "$f" | sed -u "s/^/[$(hostname)] /"
EOF
  )"
  tpu_ssh "${WORKER:-0}" "$remote"
  exit 0
fi

# Fetching: scp can copy from one worker at a time only.
if [[ ${WORKER:-all} == all ]]; then
  if [[ -z $NUM_WORKERS ]]; then
    describe=(describe "$TPU_NAME" --format='value(networkEndpoints.len())')
    if ((DRY_RUN)); then
      tpu_vm "${describe[@]}"
      echo "$PROG: dry run: assuming 1 worker; pass --num-workers N" >&2
      NUM_WORKERS=1
    else
      NUM_WORKERS=$(tpu_vm "${describe[@]}")
      [[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "could not count the workers of $TPU_NAME"
    fi
  fi
  workers=$(seq 0 $((NUM_WORKERS - 1)))
elif [[ $WORKER =~ ^[0-9]+$ ]]; then
  workers=$WORKER
else
  die "--fetch takes --worker all or a single index, got '$WORKER'"
fi

src=$REMOTE_LOGS/'*.log'
[[ -z $RUN ]] || src=$REMOTE_LOGS/$RUN.log
for i in $workers; do
  run mkdir -p "$FETCH_DIR/worker-$i"
  tpu_vm scp "$TPU_NAME:$src" "$FETCH_DIR/worker-$i/" --worker="$i"
done
