#!/usr/bin/env python3
"""Train-step time with the real data loader against the same step fed a batch already in memory.

Both go through the real training loop (bigmodel_cli.train.loop.run, with its prefetch thread) on the
recipes/bench/tiny.toml model (vocab 8000, d 128, 2 layers, T 128, B 8), in one process, interleaved:
  loader  train_batch = loader.TrainBatches over Tiny Shakespeare preprocessed with BPE 8000 (memory-mapped
          shards, Grain's shuffled order, a new batch every step);
  memory  train_batch = lambda step: held[step] (the very batches the loader yields, all built before the
          run and held in memory; --one-batch adds a third mode that feeds the first of them at every step).
Step time = B*T / tokens_per_s of each logged window of --log-every steps (the loop synchronises once per
window); the first window (compile, warm-up) is dropped, and the median over all windows of all rounds is
reported per mode (and the fastest window, less disturbed by other load on a shared machine). It also
times the loader alone, building 2000 batches in the main thread: what it costs the host per step.
The goal: loader within 2% of memory.

The process re-executes itself with GLIBC_TUNABLES set (see ../shared/STACK-NOTES.md) unless --no-tunables.

Usage:
  python scripts/bench/bench_loader.py [--rounds 3] [--steps 200] [--log-every 10] [--pack] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1"
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timed window")
    parser.add_argument("--pack", action="store_true", help="preprocess with --pack-documents (segment ids)")
    parser.add_argument("--source", type=Path, default=SHAKESPEARE)
    parser.add_argument("--one-batch", action="store_true", help="also time one batch fed at every step")
    parser.add_argument("--no-tunables", action="store_true")
    parser.add_argument("--json-out", type=Path)
    opts = parser.parse_args()
    if not opts.no_tunables and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNABLES})

    from bigmodel_cli import config, parallel, pretrain, utils
    from bigmodel_cli.console import Console
    from bigmodel_cli.data import loader
    from bigmodel_cli.data.preprocess import PreprocessConfig
    from bigmodel_cli.data.preprocess import run as preprocess
    from bigmodel_cli.train import loop

    utils.enable_compilation_cache()
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    data = tmp / "data"
    preprocess(PreprocessConfig(inputs=(opts.source,), out=data, vocab_size=8000, pack_documents=opts.pack))
    overrides = [
        "data.synthetic=false",
        f"data.path={data}",
        f"train.steps={opts.steps}",
        f"train.log_every={opts.log_every}",
        "checkpoint.async_save=false",
    ]
    cfg, parts = pretrain.resolve(config.load_config(REPO / "recipes" / "bench" / "tiny.toml", overrides))
    seq_len, batch_size = cfg.data.seq_len, cfg.train.batch_size
    windows = loader.TokenWindows(data, "train", parts[0].manifest, seq_len)
    real = loader.TrainBatches(windows, batch_size, cfg.train.seed)
    # The same batches the loader yields, built before training: what differs is only the loading itself
    # (a step's cost also depends on the tokens in it, through the embedding gather and scatter).
    held = [{k: v.copy() for k, v in real(step).items()} for step in range(opts.steps)]
    feeds = {"loader": real, "memory": lambda step: held[step]}
    if opts.one_batch:
        feeds["one-batch"] = lambda step: held[0]
    # What the loader costs the host per batch, measured alone (the loop overlaps it with the step).
    fresh = loader.TrainBatches(windows, batch_size, cfg.train.seed + 1)
    t0 = time.perf_counter()
    for step in range(2000):
        fresh(step)
    batch_ms = (time.perf_counter() - t0) / 2000 * 1000
    print(
        f"loader alone: {batch_ms:.3f} ms per batch of {batch_size}x{seq_len + 1} tokens "
        f"({windows.count} windows, load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )

    times: dict[str, list[float]] = {name: [] for name in feeds}
    mesh = parallel.make_mesh(cfg.mesh)
    for r in range(opts.rounds):
        for name in sorted(feeds, reverse=r % 2 == 1):  # alternate which mode goes first
            feed = feeds[name]
            run_dir = tmp / f"{name}-{r}"
            loop.run(
                loop.LoopInputs(
                    cfg=cfg,
                    mesh=mesh,
                    run_dir=run_dir,
                    open_batches=lambda feed=feed: loop.Batches(feed),
                    seq_len=seq_len,
                    meta={},
                    console=Console("quiet"),
                )
            )
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            step_ms = [1000 * batch_size * seq_len / row["tokens_per_s"] for row in rows[1:]]
            times[name] += step_ms
            print(
                f"round {r} {name:6s}: median step {statistics.median(step_ms):.2f} ms "
                f"({len(step_ms)} windows of {opts.log_every} steps)",
                flush=True,
            )
    median = {name: statistics.median(t) for name, t in times.items()}
    if opts.one_batch:
        print(f"one batch at every step: median {median['one-batch']:.2f} ms")
    best = {name: min(t) for name, t in times.items()}
    overhead = median["loader"] / median["memory"] - 1
    print(
        f"median step: loader {median['loader']:.2f} ms, memory {median['memory']:.2f} ms, "
        f"loader overhead {overhead:+.1%} (windows: {len(times['loader'])} each); fastest window: "
        f"loader {best['loader']:.2f} ms, memory {best['memory']:.2f} ms "
        f"({best['loader'] / best['memory'] - 1:+.1%});"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    if opts.json_out:
        result = {
            "median_ms": median,
            "best_ms": best,
            "overhead": overhead,
            "loader_alone_ms": batch_ms,
            "step_ms": times,
            "packed": opts.pack,
            "steps": opts.steps,
        }
        opts.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
