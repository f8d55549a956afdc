#!/usr/bin/env bash
# Create a Cloud TPU VM (a single host or a multi-host slice).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a TPU VM with 'gcloud compute tpus tpu-vm create'.

Options:
  --name NAME               TPU VM name          (env BIGMODEL_TPU_NAME)
  --zone ZONE               zone, e.g. us-central2-b (env BIGMODEL_TPU_ZONE)
  --project PROJECT         GCP project; default: gcloud's (env BIGMODEL_TPU_PROJECT)
  --accelerator-type TYPE   slice type, e.g. v4-8, v5litepod-16, v5p-32, v6e-8
                            (env BIGMODEL_TPU_ACCELERATOR_TYPE)
  --runtime-version VER     TPU software version; default picked from TYPE:
                            v6e-* v2-alpha-tpuv6e, v5p-* v2-alpha-tpuv5,
                            v5litepod-* v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base
  --spot                    create a Spot VM (cheap, may be preempted any time)
  --preemptible             create a preemptible VM (older form of --spot)
  --dry-run                 print the gcloud command instead of running it
  -h, --help                show this help

Example:
  $PROG --name my-tpu --zone us-central2-b --accelerator-type v4-16 --spot
EOF
}

ACCELERATOR_TYPE=${BIGMODEL_TPU_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=''
PROVISIONING=''

script_opt() {
  case $1 in
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --spot | --preemptible)
      [[ -z $PROVISIONING || $PROVISIONING == "$1" ]] || die "use only one of --spot and --preemptible"
      PROVISIONING=$1
      ;;
    *) return 1 ;;
  esac
}

parse_args "--accelerator-type --runtime-version" "$@"
require_tpu
no_rest
[[ -n $ACCELERATOR_TYPE ]] || die "missing --accelerator-type (e.g. v5litepod-16)"

if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

args=("$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ -n $PROVISIONING ]]; then
  args+=("$PROVISIONING")
fi
tpu_vm create "${args[@]}"
