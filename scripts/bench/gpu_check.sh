#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md ("GPU") in one command, for a machine lent for minutes: a start costs a
# minute or more, so every point runs in this one call, each grid under its own time limit, and a grid that
# fails (out of memory, say) is reported and skipped; all limits together stay under the 10 minutes one call may
# take. From the repository root:
#   bash scripts/bench/gpu_check.sh [OUT_DIR]
# OUT_DIR (default: $OUT, else gpu-check/) receives versions.txt, one JSON file per grid and log.txt.
# Python packages the machine lacks may come as wheels in .whl/: they go into /tmp/site first. On 2026-11-30 the
# lent H200's image lacked grain, array-record and portpicker (cp312 wheels from `pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...`).
set -uo pipefail

out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Room for the 7b preset's weights, gradients and AdamW moments (about 108 GB in f32) on a 141 GB card.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.92}

bench() {  # bench NAME SECONDS gpu_bench.py-options...: one grid; XLA's log lines stay out of the summary
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/log.txt"
    timeout "$limit" python3 scripts/bench/gpu_bench.py --out "$out/$name.json" "$@" 2>&1 \
        | grep -v '^[WIE][0-9]' | tee -a "$out/log.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    python3 -c "import flax, jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$out/versions.txt"
if ! timeout 60 python3 scripts/bench/gpu_bench.py --dry-run >"$out/dry-run.txt" 2>&1; then
    tail -5 "$out/dry-run.txt"
    echo "gpu_check: the dry run failed on this machine (above); nothing else was run" >&2
    exit 3
fi

# 1b as the preset runs it (auto attention: cuDNN), both layouts, then with remat; 7b at a batch that fits.
bench 1b_b8 150 --preset 1b --seq 2048 --batch 8 --steps 10 --attention auto --scan on,off
bench 1b_b8_dots 130 --preset 1b --seq 2048 --batch 8 --steps 8 --attention auto --scan on,off --remat dots
bench 1b_t8192_dots 90 --preset 1b --seq 8192 --batch 2 --steps 6 --attention auto --scan on --remat dots
bench 7b_b2_full 140 --preset 7b --seq 2048 --batch 2 --steps 5 --attention auto --scan on --remat full
