#!/usr/bin/env python3
"""What the compiled 35m train step does with attention, from its optimised HLO, per `model.attention`.

For each implementation it compiles the real train step (bigmodel_cli.train.state) of recipes/bench/35m.toml on
one CPU device and counts, in `compiled.as_text()`: tensors of the full score shape [B,H,T,T], dots outside
YNNPACK fusions (XLA:CPU's slow path), and XLA's own cost analysis (FLOPs and bytes accessed per step).

Usage:
  python scripts/bench/hlo_attention.py [--recipe recipes/bench/35m.toml] [--attention chunked,xla]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


def _dots_off_the_fast_path(hlo: str) -> int:
    """Dots not inside a YNNPACK custom fusion: those run on XLA:CPU's much slower Eigen fallback."""
    fast = set()
    for line in hlo.splitlines():
        if " fusion(" in line and "__ynn_fusion" in line:
            fast.add(re.search(r"calls=%?([\w.\-]+)", line).group(1))
    computation, slow = None, 0
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
        if re.search(r"\bdot\(", line) and computation not in fast:
            slow += 1
    return slow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "bench" / "35m.toml")
    parser.add_argument("--attention", default="chunked,xla")
    parser.add_argument("--json", action="store_true", help="one JSON object per implementation instead of text")
    opts = parser.parse_args()

    import jax
    import numpy as np

    from bigmodel_cli import config, parallel, pretrain
    from bigmodel_cli.model.transformer import attention_chunks
    from bigmodel_cli.train.state import jit_train_step, make_state

    for attention in opts.attention.split(","):
        cfg, _ = pretrain.resolve(config.load_config(opts.recipe, [f"model.attention={attention}"]))
        mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
        graphdef, tx, state = make_state(cfg, mesh)
        step_fn = jit_train_step(graphdef, tx, cfg.train.grad_accum, state, mesh)
        b, t = cfg.train.batch_size, cfg.data.seq_len
        zeros = np.zeros((b, t), np.int32)
        batch = {"inputs": zeros, "targets": zeros, "weights": np.ones((b, t), np.float32)}
        with parallel.activate(mesh):
            compiled = step_fn.lower(state, batch).compile()
        text = compiled.as_text()
        h = cfg.model.n_heads
        full_scores = len(re.findall(rf"f32\[{b},{h},{t},{t}\]", text))
        slow_dots = _dots_off_the_fast_path(text)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        result = {
            "attention": attention,
            "chunks": attention_chunks(cfg.model, t) if attention == "chunked" else 1,
            "full_score_tensors": full_scores,
            "slow_dots": slow_dots,
            "gflop_per_step": cost.get("flops", 0) / 1e9,
            "gb_accessed_per_step": cost.get("bytes accessed", 0) / 1e9,
        }
        if opts.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"{attention}: chunks {result['chunks']} | [{b},{h},{t},{t}] tensors in HLO: {full_scores} | "
                f"dots outside YNNPACK fusions: {slow_dots} | XLA cost analysis: {result['gflop_per_step']:.1f} "
                f"GFLOP, {result['gb_accessed_per_step']:.2f} GB accessed per step",
                flush=True,
            )


if __name__ == "__main__":
    main()
