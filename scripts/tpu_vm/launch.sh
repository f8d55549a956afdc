#!/usr/bin/env bash
# Run one command (normally a bigmodel command) on every worker of a TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options] -- COMMAND [ARGS...]

Run COMMAND at the same time on every worker (--worker=all), inside
~/$REMOTE_VENV (see setup.sh), from the home directory. By default it runs
under nohup in the background, its output goes to ~/$REMOTE_LOGS/RUN.log
and its pid to ~/$REMOTE_LOGS/RUN.pid on each worker, and this script returns
at once; follow it with logs.sh and end it with stop.sh.

No coordinator flags are needed: on a TPU VM, jax.distributed.initialize()
finds the other workers of the slice by itself. Give every run a gs:// run
dir, since the workers' disks go away when the TPU VM is deleted or preempted.

Options:
  --name NAME        TPU VM name          (env BIGMODEL_TPU_NAME)
  --zone ZONE        zone                 (env BIGMODEL_TPU_ZONE)
  --project PROJECT  GCP project          (env BIGMODEL_TPU_PROJECT)
  --run RUN          name of the log; default: the last part of the command's
                     --run-dir, else run-YYYYmmdd-HHMMSS
  --foreground       stream the output here instead (still logged)
  --dry-run          print the gcloud command instead of running it
  -h, --help         show this help

Example:
  $PROG --name my-tpu --zone us-central2-b -- \\
    bigmodel pretrain recipes/base.toml --run-dir gs://my-bucket/runs/r1
EOF
}

RUN=''
FOREGROUND=0

script_opt() {
  case $1 in
    --run) RUN=$2 ;;
    --foreground) FOREGROUND=1 ;;
    *) return 1 ;;
  esac
}

parse_args "--run" "$@"
require_tpu
((${#REST[@]} > 0)) || die "missing command: put it after -- (see --help)"

# Default run name: the last path component of --run-dir, if the command has one.
if [[ -z $RUN ]]; then
  prev=''
  for arg in "${REST[@]}"; do
    case $arg in
      --run-dir=*) RUN=${arg#--run-dir=} ;;
      *) [[ $prev != --run-dir ]] || RUN=$arg ;;
    esac
    prev=$arg
  done
  RUN=${RUN%/}
  RUN=${RUN##*/}
  [[ $RUN =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || RUN=run-$(date -u +%Y%m%d-%H%M%S)
fi
check_run_name "$RUN"

log=$REMOTE_LOGS/$RUN.log
pidfile=$REMOTE_LOGS/$RUN.pid
cmd=$(quote_cmd "${REST[@]}")
remote="cd && mkdir -p $REMOTE_LOGS && . $REMOTE_VENV/bin/activate || exit 1
if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then
  echo \"\$(hostname): run $RUN is already running (stop.sh stops it)\" >&2; exit 1
fi
"
if ((FOREGROUND)); then
  remote+="$cmd > >(tee $log) 2>&1 &
echo \$! > $pidfile; wait \$!"
else
  # setsid: own process group, so that stop.sh can kill the run's children too.
  remote+="setsid nohup $cmd > $log 2>&1 < /dev/null &
echo \$! > $pidfile
echo \"\$(hostname): started $RUN (pid \$!), log: ~/$log\""
fi

tpu_ssh all "$remote"
if ((!DRY_RUN && !FOREGROUND)); then
  echo "Follow with: $(dirname "$0")/logs.sh --name $TPU_NAME --zone $TPU_ZONE --run $RUN" >&2
fi
