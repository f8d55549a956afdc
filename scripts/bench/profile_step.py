#!/usr/bin/env python3
"""Where the time of one train step goes, by kind of op: a jax.profiler trace read against the optimised HLO.

It compiles the real train step (bigmodel_cli.train.state) of a recipe on one CPU device, runs --steps traced
steps, and shares each instant of the trace equally among the ops running at that moment (XLA:CPU runs
independent ops concurrently), so the rows add up to the wall time of a step. Each op is classified from its
shape and source in `compiled.as_text()`:
  matmul (projections, MLP, head)   YNNPACK fusions outside attention
  matmul (attention)                YNNPACK fusions of the attention (rank-5 kernel shapes or attention sources)
  transpose / copy                  transposes, copies, slices and pads
  elementwise                       everything else (norms, residuals, softmax, RoPE, AdamW, cross-entropy)
and the largest non-matmul ops are listed by shape and source.

With --time SECONDS it traces nothing: it runs the step back to back for that long and prints its fastest and
median time (--no-tunables: under glibc's default malloc settings instead of the CLI's, to weigh them).

Usage:
  python scripts/bench/profile_step.py [--recipe recipes/bench/35m.toml] [--steps 2] [--set KEY=VALUE ...]
  python scripts/bench/profile_step.py --recipe R --time 15 [--no-tunables] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bigmodel_cli.host import CPU_MALLOC_TUNABLES as TUNABLES  # noqa: E402
from bigmodel_cli.host import with_cpu_compile_flags  # noqa: E402


def hlo_ops(hlo: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (shape, opcode, source op_name)."""
    ops = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w-]+)\(", line)
        if match:
            source = re.search(r'op_name="([^"]+)"', line)
            ops[match.group(1)] = (match.group(2), match.group(3), source.group(1) if source else "")
    return ops


def category(name: str, shape: str, opcode: str, source: str) -> str:
    # The chunked kernel's tensors are rank 5 and its einsums name "bkg..."; XLA's attention names itself.
    rank5 = any(dims.count(",") == 4 for dims in re.findall(r"\[([\d,]*)\]", shape))
    attention = rank5 or "bkg" in source or "attention" in source
    if name.startswith("ynn"):
        return "matmul (attention)" if attention else "matmul (projections, MLP, head)"
    if opcode in ("transpose", "copy", "slice", "pad") or re.search(r"transpose|copy|slice|pad", name):
        return "transpose / copy"
    return "elementwise"


def wall_shares(events: list[dict]) -> list[float]:
    """Each event's share of wall time (µs), an instant split equally among the events running then."""
    delta: dict[float, int] = collections.Counter()
    for e in events:
        delta[e["ts"]] += 1
        delta[e["ts"] + e["dur"]] -= 1
    points = sorted(delta)
    weight, running = {}, 0
    for here, there in zip(points, points[1:], strict=False):
        running += delta[here]
        weight[here] = (there - here) / running if running else 0.0
    index = {p: i for i, p in enumerate(points)}
    return [sum(weight[points[i]] for i in range(index[e["ts"]], index[e["ts"] + e["dur"]])) for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "bench" / "35m.toml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=8, help="largest non-matmul ops to list per category")
    parser.add_argument("--time", type=float, default=0.0, help="seconds of untraced steps to time instead")
    parser.add_argument("--no-tunables", action="store_true", help="glibc's malloc defaults (with --time)")
    opts = parser.parse_args()
    if opts.no_tunables and not opts.time:
        parser.error("--no-tunables goes with --time")
    flags = os.environ.get("XLA_FLAGS", "")
    if "device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=1"
    os.environ["XLA_FLAGS"] = with_cpu_compile_flags(flags)  # as the CLI compiles, unless set here
    if os.environ.get("GLIBC_TUNABLES") != TUNABLES and not opts.no_tunables:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNABLES})

    import jax
    import numpy as np

    from bigmodel_cli import config, parallel, pretrain
    from bigmodel_cli.train.state import jit_train_step, make_state

    cfg, _ = pretrain.resolve(config.load_config(opts.recipe, opts.overrides))
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, tx, state = make_state(cfg, mesh)
    step_fn = jit_train_step(graphdef, tx, cfg.train.grad_accum, state, mesh)
    b, t, v = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, v, (b, t)).astype(np.int32),
        "targets": rng.integers(0, v, (b, t)).astype(np.int32),
        "weights": np.ones((b, t), np.float32),
    }
    with parallel.activate(mesh):
        compiled = step_fn.lower(state, batch).compile()
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        if opts.time:
            times, end = [], time.perf_counter() + opts.time
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                times.append((time.perf_counter() - t0) * 1000)
            malloc = "glibc defaults" if opts.no_tunables else "CLI malloc settings"
            print(f"{opts.recipe.name} ({malloc}): {len(times)} steps, fastest {min(times):.1f} ms, "
                  f"median {float(np.median(times)):.1f} ms")  # fmt: skip
            return
    trace_dir = Path(tempfile.mkdtemp(prefix="bigmodel-profile-"))
    with parallel.activate(mesh):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        plain = time.perf_counter() - t0
        jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
        for _ in range(opts.steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        jax.profiler.stop_trace()

    ops = hlo_ops(compiled.as_text())
    trace_file = sorted(trace_dir.rglob("*perfetto_trace.json.gz"))[-1]
    trace = json.load(gzip.open(trace_file))
    events = [e for e in trace.get("traceEvents", trace) if e.get("ph") == "X" and "dur" in e and e["name"] in ops]
    shares = wall_shares(events)
    totals: dict[str, float] = collections.defaultdict(float)
    by_source: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
    for event, share in zip(events, shares, strict=True):
        shape, opcode, source = ops[event["name"]]
        kind = category(event["name"], shape, opcode, source)
        ms = share / 1000 / opts.steps
        totals[kind] += ms
        if not kind.startswith("matmul"):
            key = (kind, shape.split("{")[0], source.rsplit("/", 1)[-1])
            by_source[key][0] += ms
            by_source[key][1] += 1
    step_ms = sum(totals.values())
    print(f"{opts.recipe.name}: {step_ms:,.0f} ms per traced step ({plain * 1000:,.0f} ms untraced)")
    print("| category | ms/step | share |\n|---|---|---|")
    for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:,.0f} | {100 * ms / step_ms:.1f}% |")
    print("\nlargest non-matmul ops (category, shape, source: ms/step, count per step)")
    for (kind, shape, source), (ms, count) in sorted(by_source.items(), key=lambda kv: -kv[1][0])[: opts.top * 2]:
        print(f"  {kind:16s} {shape:24s} {source[:40]:40s} {ms:7.1f} ms  x{count // opts.steps}")


if __name__ == "__main__":
    main()
