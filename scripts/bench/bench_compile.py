#!/usr/bin/env python3
"""Compile time of the train step by depth, unrolled against scanned layers (model.scan_layers).

Runs the real `bigmodel plan` (an ahead-of-time compile of the train step for abstract arrays on this CPU, one
device) for each preset and depth, with an empty persistent compilation cache each time, and reads the
seconds plan spent tracing and compiling (`compile_seconds` in its --json output):
    python scripts/bench/bench_compile.py --presets 1b,7b --layers 8,16,32 --out compile.json
Prints one JSON line per point (the fastest of --repeat plans: other processes on a shared host only ever add
time) and a Markdown table; a plan that runs past --timeout is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def plan(preset: str, layers: int, scan: bool, seq: int, batch: int, timeout: float, extra: list[str]) -> dict:
    """One `bigmodel plan` in a fresh process and an empty compilation cache: its compile and wall seconds."""
    settings = {
        "model.preset": preset,
        "model.n_layers": layers,
        "model.scan_layers": str(scan).lower(),
        "model.vocab_size": 32000,
        "data.seq_len": seq,
        "train.batch_size": batch,
        "mesh.data": 1,
        "mesh.fsdp": 1,
        "mesh.tensor": 1,
    }
    with tempfile.TemporaryDirectory() as scratch:
        recipe = Path(scratch) / "plan.toml"
        recipe.write_text(f'[model]\npreset = "{preset}"\n')
        command = [sys.executable, "-m", "bigmodel_cli", "plan", str(recipe), "--json"]
        for key, value in settings.items():
            command += ["--set", f"{key}={value}"]
        for setting in extra:
            command += ["--set", setting]
        env = {**os.environ, "BIGMODEL_CACHE_DIR": str(Path(scratch) / "jax-cache"), "PYTHONPATH": str(REPO)}
        row = {"preset": preset, "layers": layers, "scan": scan, "seq": seq, "batch": batch, "set": extra}
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {**row, "compile_s": None, "wall_s": None, "note": f"over {timeout:.0f} s"}
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {**row, "compile_s": None, "wall_s": round(wall, 1), "note": proc.stderr.strip().splitlines()[-1]}
    result = json.loads(proc.stdout)
    return {**row, "compile_s": result["compile_seconds"], "wall_s": round(wall, 1), "note": ""}


def table(rows: list[dict]) -> str:
    """Markdown: per preset and depth, unrolled and scanned compile seconds and their ratio."""
    lines = ["| preset | layers | unrolled (s) | scanned (s) | unrolled / scanned |", "|---|---:|---:|---:|---:|"]
    by_key = {(r["preset"], r["layers"], r["scan"]): r for r in rows}
    for preset, layers in dict.fromkeys((r["preset"], r["layers"]) for r in rows):
        unrolled, scanned = by_key.get((preset, layers, False)), by_key.get((preset, layers, True))

        def cell(r):
            return "-" if r is None else (f"{r['compile_s']:.1f}" if r["compile_s"] is not None else r["note"])

        ratio = "-"
        if unrolled and scanned and unrolled["compile_s"] and scanned["compile_s"]:
            ratio = f"{unrolled['compile_s'] / scanned['compile_s']:.1f}x"
        lines.append(f"| {preset} | {layers} | {cell(unrolled)} | {cell(scanned)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="1b,7b")
    parser.add_argument("--layers", default="8,16,32")
    parser.add_argument("--layouts", default="scanned,unrolled", help="which of scanned, unrolled to plan")
    parser.add_argument("--seq", type=int, default=512, help="sequence length of the planned step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one plan may take")
    parser.add_argument("--repeat", type=int, default=1, help="plans per point; the fastest is kept (shared hosts)")
    parser.add_argument("--set", action="append", default=[], help="more plan settings, e.g. model.attention=xla")
    parser.add_argument("--out", type=Path, help="also write the rows and the host as JSON here")
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        for layers in (int(n) for n in args.layers.split(",")):
            for layout in args.layouts.split(","):
                tries = [plan(preset, layers, layout == "scanned", args.seq, args.batch, args.timeout, args.set)]
                while len(tries) < args.repeat and tries[-1]["compile_s"] is not None:
                    tries.append(
                        plan(preset, layers, layout == "scanned", args.seq, args.batch, args.timeout, args.set)
                    )
                timed = [t for t in tries if t["compile_s"] is not None]
                row = min(timed, key=lambda t: t["compile_s"]) if timed else tries[-1]
                row["tries_s"] = [t["compile_s"] for t in tries]
                print(json.dumps(row), flush=True)
                rows.append(row)
    sys.path.insert(0, str(REPO))
    from bigmodel_cli.utils import describe_host, host_line

    host = describe_host()  # CPU, x86 family, ISA and cores, as every benchmark table records them
    print(f"\nhost: {host_line(host)}\n\n{table(rows)}")
    if args.out:
        args.out.write_text(json.dumps({"host": host, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
