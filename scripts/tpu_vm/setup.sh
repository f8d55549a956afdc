#!/usr/bin/env bash
# Install bigmodel (and jax[tpu]) into a virtualenv on every worker of a TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --source git+URL|PATH [options]

On every worker (--worker=all): create the virtualenv ~/$REMOTE_VENV, then
pip install 'jax[tpu]' and bigmodel. A local wheel or sdist is first copied
to every worker with 'gcloud compute tpus tpu-vm scp'.

Options:
  --name NAME          TPU VM name          (env BIGMODEL_TPU_NAME)
  --zone ZONE          zone                 (env BIGMODEL_TPU_ZONE)
  --project PROJECT    GCP project          (env BIGMODEL_TPU_PROJECT)
  --source SRC         what to install: git+https://...[@REF], or the path of a
                       wheel (.whl) or sdist (.tar.gz, .zip) built with
                       'python -m build'    (env BIGMODEL_TPU_SOURCE)
  --python PYTHON      interpreter for the venv, 3.11 or newer; installed with
                       apt-get when missing (default: python3.11)
  --dry-run            print the gcloud commands instead of running them
  -h, --help           show this help

Example:
  python -m build --wheel
  $PROG --name my-tpu --zone us-central2-b --source dist/bigmodel-0.1.0-py3-none-any.whl
EOF
}

SOURCE=${BIGMODEL_TPU_SOURCE:-}
PYTHON=python3.11

script_opt() {
  case $1 in
    --source) SOURCE=$2 ;;
    --python) PYTHON=$2 ;;
    *) return 1 ;;
  esac
}

parse_args "--source --python" "$@"
require_tpu
no_rest
[[ -n $SOURCE ]] || die "missing --source (git+URL or a wheel/sdist path)"
[[ $PYTHON =~ ^[A-Za-z0-9._/-]+$ ]] || die "bad --python '$PYTHON'"

# With the [gcs] extra: run directories on TPU VMs live in gs:// buckets (docs/tpu_vm.md).
case $SOURCE in
  git+*) spec="bigmodel[gcs] @ $SOURCE" ;;
  *.whl | *.tar.gz | *.zip)
    [[ -f $SOURCE ]] || die "no such file: $SOURCE"
    spec="./$(basename "$SOURCE")[gcs]"
    # A remote path without a leading / is relative to the home directory.
    tpu_vm scp "$SOURCE" "$TPU_NAME:$(basename "$SOURCE")" --worker=all
    ;;
  *) die "--source must be git+URL or a .whl/.tar.gz/.zip file, got '$SOURCE'" ;;
esac

# The worker-side script. The python3.11 packages exist on the Ubuntu 22.04
# images that the TPU runtimes use; their own python3 is 3.10.
remote="set -e; cd
if ! command -v $PYTHON >/dev/null; then
  sudo apt-get -o DPkg::Lock::Timeout=600 update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q $PYTHON $PYTHON-venv
fi
$PYTHON -m venv $REMOTE_VENV
$REMOTE_VENV/bin/pip install -q -U pip
$REMOTE_VENV/bin/pip install -U 'jax[tpu]' $(printf '%q' "$spec")
$REMOTE_VENV/bin/bigmodel --help >/dev/null
echo \"\$(hostname): bigmodel installed in ~/$REMOTE_VENV\""
tpu_ssh all "$remote"
