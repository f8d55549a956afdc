#!/usr/bin/env bash
# Stop the runs that launch.sh started, on every worker of a TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--run RUN] [--grace SECONDS]

On every worker (--worker=all), send SIGTERM to the run(s) started by
launch.sh (found through ~/$REMOTE_LOGS/RUN.pid). bigmodel then saves a
checkpoint at the next step boundary and exits. Whatever still runs after the
grace period is killed with SIGKILL, with its child processes.

Options:
  --name NAME          TPU VM name          (env BIGMODEL_TPU_NAME)
  --zone ZONE          zone                 (env BIGMODEL_TPU_ZONE)
  --project PROJECT    GCP project          (env BIGMODEL_TPU_PROJECT)
  --run RUN            stop only this run (default: every run)
  --grace SECONDS      wait this long after SIGTERM before SIGKILL (default: 120)
  --dry-run            print the gcloud command instead of running it
  -h, --help           show this help

Example:
  $PROG --name my-tpu --zone us-central2-b --run r1 --grace 300
EOF
}

RUN=''
GRACE=120

script_opt() {
  case $1 in
    --run) RUN=$2 ;;
    --grace) GRACE=$2 ;;
    *) return 1 ;;
  esac
}

parse_args "--run --grace" "$@"
require_tpu
no_rest
[[ -z $RUN ]] || check_run_name "$RUN"
check_int --grace "$GRACE"

# The worker-side script gets its settings as variables.
remote="logs=$REMOTE_LOGS run=$RUN grace=$GRACE; $(
  cat <<'EOF'
cd || exit 1
host=$(hostname) pids= files=
for f in "$logs"/${run:-*}.pid; do
  [ -f "$f" ] || continue
  files="$files $f"
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then pids="$pids $pid"; fi
done
if [ -z "$pids" ]; then echo "$host: nothing running"; rm -f $files; exit 0; fi
echo "$host: SIGTERM to$pids; SIGKILL in ${grace}s if still running"
kill -TERM $pids 2>/dev/null || true
end=$((SECONDS + grace))
while [ "$SECONDS" -lt "$end" ]; do
  alive=
  for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ -n "$alive" ] || break
  sleep 1
done
for pid in $pids; do
  if kill -0 "$pid" 2>/dev/null; then echo "$host: SIGKILL to $pid"; fi
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
done
rm -f $files
echo "$host: stopped"
EOF
)"
tpu_ssh all "$remote"
