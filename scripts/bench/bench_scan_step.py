#!/usr/bin/env python3
"""Train-step time with scanned layers (model.scan_layers) against unrolled ones, interleaved, on this CPU.

Each round runs the real CLI on recipes/bench/<cfg>.toml twice, unrolled then scanned, exactly as
bench_vs_torch.py runs bigmodel (one CPU device, the malloc tunables), and takes the median step time of the
timed steps of each; the table gives min - median - max over rounds of scanned / unrolled step time:
    python scripts/bench/bench_scan_step.py --configs tiny,35m --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_torch import REPO, bigmodel_cmd, child_env, dims, run_measured  # noqa: E402

WARMUP_STEPS = 2  # as bench_vs_torch: the first two steps include compiling


def step_ms(cfg: str, steps: int, scan: bool) -> float:
    """Median step time (ms) of one pretrain run of cfg, scanned or unrolled."""
    with tempfile.TemporaryDirectory(prefix=f"bench-scan-{cfg}-") as tmp:
        run_dir = str(Path(tmp) / "run")
        command = bigmodel_cmd(cfg, steps, run_dir) + ["--set", f"model.scan_layers={str(scan).lower()}"]
        proc, _ = run_measured(command, child_env(tunables=True), REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    timed = [r for r in records if r["step"] > WARMUP_STEPS and r.get("tokens_per_s")]
    shape = dims(cfg)
    return statistics.median(shape["B"] * shape["T"] / r["tokens_per_s"] * 1e3 for r in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,35m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run, after 2 warm-up steps")
    args = parser.parse_args()
    lines = [
        "| config | unrolled step ms (median) | scanned step ms (median) | scanned / unrolled (min - median - max) |"
    ]
    lines.append("|---|---:|---:|---:|")
    for cfg in args.configs.split(","):
        pairs = []
        for _ in range(args.rounds):
            pair = (step_ms(cfg, args.steps, scan=False), step_ms(cfg, args.steps, scan=True))
            print(json.dumps({"config": cfg, "unrolled_ms": round(pair[0], 1), "scanned_ms": round(pair[1], 1)}))
            pairs.append(pair)
        ratios = sorted(s / u for u, s in pairs)
        unrolled, scanned = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        spread = f"{ratios[0]:.3f} - {statistics.median(ratios):.3f} - {ratios[-1]:.3f}"
        lines.append(f"| {cfg} | {unrolled:.1f} | {scanned:.1f} | {spread} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
