#!/usr/bin/env bash
# Delete a Cloud TPU VM, after asking for confirmation.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--yes]

Delete the TPU VM with 'gcloud compute tpus tpu-vm delete'. Everything on its
disks is lost; checkpoints in a gs:// run dir are not. Asks first, unless --yes.

Options:
  --name NAME          TPU VM name          (env BIGMODEL_TPU_NAME)
  --zone ZONE          zone                 (env BIGMODEL_TPU_ZONE)
  --project PROJECT    GCP project          (env BIGMODEL_TPU_PROJECT)
  --yes                do not ask for confirmation
  --dry-run            print the gcloud command instead of running it
  -h, --help           show this help

Example:
  $PROG --name my-tpu --zone us-central2-b --yes
EOF
}

YES=0

script_opt() {
  case $1 in
    --yes) YES=1 ;;
    *) return 1 ;;
  esac
}

parse_args "" "$@"
require_tpu
no_rest

if ((!YES && !DRY_RUN)); then
  printf 'Delete TPU VM %s in %s? Its disks are lost. [y/N] ' "$TPU_NAME" "$TPU_ZONE" >&2
  answer=''
  read -r answer || echo >&2
  [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "not deleted (answer y, or pass --yes)"
fi
# --quiet: we have asked already, so gcloud must not ask again.
tpu_vm delete "$TPU_NAME" --quiet
