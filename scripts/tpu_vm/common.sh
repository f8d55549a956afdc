#!/usr/bin/env bash
# Shared helpers for the scripts in scripts/tpu_vm/. Sourced, not run.
#
# A script using it defines usage() and, if it has options of its own,
# script_opt OPT VALUE (returns non-zero for an option it does not know),
# then calls: parse_args "VALUE-TAKING OPTIONS" "$@"
set -euo pipefail

PROG=$(basename "$0")

# Defaults come from the environment; command-line options override them.
TPU_NAME=${BIGMODEL_TPU_NAME:-}
TPU_ZONE=${BIGMODEL_TPU_ZONE:-}
TPU_PROJECT=${BIGMODEL_TPU_PROJECT:-}
DRY_RUN=0
REST=()  # arguments after "--"

# Layout on every worker, relative to the remote user's home directory.
# shellcheck disable=SC2034  # used by the scripts that source this file
REMOTE_VENV=bigmodel-venv REMOTE_LOGS=bigmodel-logs

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# parse_args "OPTS TAKING A VALUE" ARGS...
# Understands --opt VALUE and --opt=VALUE, the common options (--name, --zone,
# --project, --dry-run, --help) and "--"; anything else goes to script_opt.
parse_args() {
  local value_opts=" --name --zone --project $1 " opt val has_val
  shift
  while (($#)); do
    opt=$1 val='' has_val=0
    case $opt in
      --) shift; REST=("$@"); return 0 ;;
      --*=*) val=${opt#*=} opt=${opt%%=*} has_val=1 ;;
    esac
    if [[ $value_opts == *" $opt "* ]]; then
      if ((!has_val)); then
        if (($# < 2)) || [[ $2 == --* ]]; then
          die "option $opt needs a value"
        fi
        val=$2
        shift
      fi
    elif ((has_val)); then
      die "option $opt takes no value"
    fi
    case $opt in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --name) TPU_NAME=$val ;;
      --zone) TPU_ZONE=$val ;;
      --project) TPU_PROJECT=$val ;;
      -*) script_opt "$opt" "$val" || die "unknown option $opt (see --help)" ;;
      *) die "unexpected argument '$opt' (see --help)" ;;
    esac
    shift
  done
}

# Fails unless the TPU name and zone are known.
require_tpu() {
  [[ -n $TPU_NAME ]] || die "missing --name (or set BIGMODEL_TPU_NAME)"
  [[ -n $TPU_ZONE ]] || die "missing --zone (or set BIGMODEL_TPU_ZONE)"
}

# Fails if arguments were given after "--" (only launch.sh takes a command).
no_rest() {
  ((${#REST[@]} == 0)) || die "unexpected arguments after -- (see --help)"
}

# check_int OPTION VALUE: VALUE must be a non-negative integer.
check_int() {
  [[ $2 =~ ^[0-9]+$ ]] || die "option $1 needs a non-negative integer, got '$2'"
}

# check_run_name VALUE: a run name becomes a file name on the workers.
check_run_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    die "bad run name '$1' (use letters, digits, '.', '_' and '-')"
}

# Prints a command on one line, quoted so that it can be pasted into a shell.
quote_cmd() {
  local line
  printf -v line '%q ' "$@"
  printf '%s\n' "${line% }"
}

# Runs a command, or only prints it with --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
  else
    "$@"
  fi
}

# tpu_vm SUBCOMMAND ARGS...: gcloud compute tpus tpu-vm with --zone/--project.
tpu_vm() {
  local sub=$1
  shift
  if [[ -n $TPU_PROJECT ]]; then
    set -- "$@" --project="$TPU_PROJECT"
  fi
  run gcloud compute tpus tpu-vm "$sub" "$@" --zone="$TPU_ZONE"
}

# tpu_ssh WORKER REMOTE_COMMAND: runs a bash command on the chosen workers.
tpu_ssh() {
  tpu_vm ssh "$TPU_NAME" --worker="$1" --command "$2"
}
