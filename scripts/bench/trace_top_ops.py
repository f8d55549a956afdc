#!/usr/bin/env python3
"""The top ops by self time in a `--profile-steps` trace: what a first look in Perfetto or TensorBoard shows.

Reads the newest RUN/profile/plugins/profile/*/perfetto_trace.json.gz and sums, per event name, its self time
(its duration minus that of the events nested inside it on the same thread), divided by the number of traced
steps. XLA's ops (fusions, copies, `ynn_fusion` matmuls) run on the XLA:CPU worker threads; Python functions
(the loop, the data loader) are the `$file:line name` events of the Python threads; `--python` lists those too.

Usage:
  python scripts/bench/trace_top_ops.py RUN_DIR --steps 2 [--top 15] [--python]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def self_times(events: list[dict]) -> dict[str, list[float]]:
    """name -> [self time µs summed, count]; nesting is per thread, by start time and duration."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["pid"], e["tid"]].append(e)
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []  # open events, each with the time its children took
        for e in thread_events:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                _close(stack.pop(), totals)
            if stack:
                stack[-1]["children"] += e["dur"]
            stack.append({**e, "children": 0.0})
        while stack:
            _close(stack.pop(), totals)
    return totals


def _close(e: dict, totals: dict) -> None:
    totals[e["name"]][0] += max(e["dur"] - e["children"], 0.0)
    totals[e["name"]][1] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (B - A of --profile-steps)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--python", action="store_true", help="list Python functions too")
    opts = parser.parse_args()
    traces = sorted((opts.run_dir / "profile" / "plugins" / "profile").glob("*/perfetto_trace.json.gz"))
    if not traces:
        raise SystemExit(f"no trace under {opts.run_dir / 'profile'}: train with --profile-steps A:B first")
    trace = json.load(gzip.open(traces[-1]))
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]
    if not opts.python:
        events = [e for e in events if not e["name"].startswith("$")]
    totals = self_times(events)
    print(f"{traces[-1]}\n| op | self ms/step | calls/step |\n|---|---|---|")
    for name, (us, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: opts.top]:
        print(f"| `{name}` | {us / 1000 / opts.steps:.2f} | {count / opts.steps:g} |")


if __name__ == "__main__":
    main()
