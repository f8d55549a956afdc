#!/usr/bin/env bash
# Issue #17's AVX2 figures in one command, for the session that finally lands on an AVX2 host (most sessions get
# AVX-512 ones, and an AVX-512 host cannot stand in: XLA's ISA cap does not reach its YNNPACK matmuls, see
# docs/benchmarks.md, "No AVX2 stand-in on an AVX-512 host"). From the repository root, on a quiet machine:
#   bash scripts/bench/avx2_check.sh [OUT_DIR]        # about 20 minutes on a 2-core AVX2 EPYC
# OUT_DIR (default avx2-check/) receives host.txt, vs_torch.json (bench_vs_torch.py: the >= 1.2x goal on 35m,
# both libraries' matmul rates) and blocks.txt (the chunked attention's block count, 4 against 8, at the two
# lengths where the automatic rule was chosen on AVX-512 hosts), all also in log.txt.
# AVX2_CHECK_ANY_HOST=1 runs it on another host kind (to try the script, not for the figures).
set -uo pipefail

out=${1:-avx2-check}
mkdir -p "$out"
if grep -q -m1 avx512f /proc/cpuinfo && [ -z "${AVX2_CHECK_ANY_HOST:-}" ]; then
    echo "avx2_check: this host has AVX-512 (avx512f in /proc/cpuinfo); the figures need an AVX2 one" >&2
    exit 2
fi
{
    grep -m1 "model name" /proc/cpuinfo
    grep -m1 "cpu family" /proc/cpuinfo
    echo "cores: $(nproc), avx2: $(grep -c -m1 ' avx2 ' /proc/cpuinfo), avx512f: $(grep -c -m1 avx512f /proc/cpuinfo)"
    python -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$out/host.txt" "$out/log.txt"

python scripts/bench/bench_vs_torch.py --configs 35m,tiny --rounds 3 --wait-idle 300 --retry-busy 2 \
    --json-out "$out/vs_torch.json" 2>&1 | tee -a "$out/log.txt"

# profile_step.py --time prints the fastest and the median step of a compiled step run back to back.
blocks() {  # blocks T B: 4 then 8 blocks, twice, alternating
    local t=$1 b=$2
    for round in 1 2; do
        for n in 4 8; do
            echo "T=$t B=$b blocks=$n round $round: $(python scripts/bench/profile_step.py \
                --recipe recipes/bench/35m.toml --time 12 --set model.attention_chunks=$n \
                --set model.max_seq_len="$t" --set data.seq_len="$t" --set train.batch_size="$b" 2>&1 | tail -1)"
        done
    done
}
{
    blocks 512 8
    blocks 2048 2
} | tee "$out/blocks.txt" | tee -a "$out/log.txt"
echo "avx2_check: wrote $out/ (the automatic rule is one block per 64 queries, at most 8)"
