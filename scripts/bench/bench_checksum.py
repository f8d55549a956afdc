#!/usr/bin/env python3
"""What the per-shard checkpoint checksums cost, as a share of a 35m checkpoint's save and restore.

The state is the one `bigmodel pretrain recipes/bench/35m.toml` checkpoints: the 35m model's parameters and its
AdamW state (~106M f32 values, ~425 MB), created as the training loop creates them. Each round, interleaved:
  save      Checkpoints.save (shard hashes, then Orbax's async write) through wait_until_finished;
  restore   Checkpoints.restore of params and optimizer state: the meta read and fit check, Orbax's read of
            the arrays, and the checksum verification.
Inside those, the checksum parts are timed alone on the same arrays: `describe` (the shard hashes) of both
items on save, `first_bad_array` of both items on restore; and `check_fits` (meta read and fit check) apart.
The first round is a warm-up and is dropped; medians over the others are reported. Goal: checksums <= 10% of
save and of restore.

Usage:
  python scripts/bench/bench_checksum.py [--rounds 6] [--recipe recipes/bench/35m.toml] [--dir DIR] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds, the first one dropped as a warm-up")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "bench" / "35m.toml")
    parser.add_argument("--dir", type=Path, help="where to write checkpoints (default: a temporary directory)")
    parser.add_argument("--json-out", type=Path)
    opts = parser.parse_args()

    import jax

    from bigmodel_cli import config, parallel
    from bigmodel_cli.train import checkpoint
    from bigmodel_cli.train.state import make_state
    from bigmodel_cli.utils import host_line

    cfg = config.load_config(opts.recipe)
    mesh = parallel.make_mesh(cfg.mesh)
    _, _, state = make_state(cfg, mesh)
    state = {item: state[item] for item in checkpoint.ARRAY_ITEMS}
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    root = Path(tempfile.mkdtemp(prefix="bench-checksum-", dir=opts.dir))
    ckpt = checkpoint.Checkpoints(root / "checkpoints", keep=2, async_save=cfg.checkpoint.async_save)
    rows: dict[str, list[float]] = {k: [] for k in ("save", "hash", "restore", "fits", "verify")}
    try:
        for step in range(1, opts.rounds + 1):
            timings = {}
            t0 = time.perf_counter()
            ckpt.save(step, state, {"step": step}, force=True)
            ckpt.wait()
            timings["save"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            arrays = {item: checkpoint.describe(state[item]) for item in checkpoint.ARRAY_ITEMS}
            timings["hash"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            restored, _ = ckpt.restore(step, state)
            jax.block_until_ready(restored)
            timings["restore"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ckpt.check_fits(step, state)
            timings["fits"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            bad = [checkpoint.first_bad_array(restored[item], arrays[item]) for item in checkpoint.ARRAY_ITEMS]
            timings["verify"] = time.perf_counter() - t0
            assert bad == [None, None], bad
            del restored
            print(" | ".join(f"{k} {v:.3f}s" for k, v in timings.items()), flush=True)
            if step > 1:
                for key, value in timings.items():
                    rows[key].append(value)
    finally:
        ckpt.close()
        shutil.rmtree(root, ignore_errors=True)

    med = {key: statistics.median(values) for key, values in rows.items()}
    result = {
        "host": host_line(),  # the figures depend on the CPU and its vector width
        "recipe": str(opts.recipe.relative_to(REPO) if opts.recipe.is_relative_to(REPO) else opts.recipe),
        "state_mb": nbytes / 1e6,
        "rounds": len(rows["save"]),
        "median_s": med,
        "range_s": {key: [min(values), max(values)] for key, values in rows.items()},
        "hash_share_of_save": med["hash"] / med["save"],
        "verify_share_of_restore": med["verify"] / med["restore"],
        "fits_share_of_restore": med["fits"] / med["restore"],
        "hash_gb_per_s": nbytes / med["hash"] / 1e9,
    }
    print(json.dumps(result, indent=2))
    if opts.json_out:
        opts.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
