#!/usr/bin/env python3
"""What the optimizer's update costs alone, per optimizer and layer layout, for a recipe's model on this CPU:
    python scripts/bench/bench_optimizer.py --recipe recipes/shakespeare_char.toml --set model.vocab_size=68
Times the jitted `tx.update` (clipping, AdamW or Muon, schedule) of make_optimizer on the recipe's parameters,
with the parameters standing in for the gradients, and prints the median and fastest of --repeat calls in ms
for each of optim.name = adamw, muon and model.scan_layers = false, true, as JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def time_update(cfg, name: str, repeat: int) -> dict:
    import jax

    from bigmodel_cli import parallel
    from bigmodel_cli.model.params import init_params
    from bigmodel_cli.train.optim import make_optimizer

    mesh = parallel.make_mesh(cfg.mesh)
    _, params = init_params(cfg.model, mesh, cfg.train.seed)
    tx = make_optimizer(dataclasses.replace(cfg.optim, name=name), cfg.train.steps)
    state = tx.init(params)
    update = jax.jit(tx.update)
    jax.block_until_ready(update(params, state, params))  # compile
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        jax.block_until_ready(update(params, state, params))
        seconds.append(time.perf_counter() - started)
    return {"median_ms": round(statistics.median(seconds) * 1e3, 2), "fastest_ms": round(min(seconds) * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "shakespeare_char.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()

    from bigmodel_cli import config as config_lib
    from bigmodel_cli.utils import host_line

    print(json.dumps({"host": host_line(), "recipe": str(args.recipe), "set": args.overrides}))
    for scan in (False, True):
        cfg = config_lib.load_config(args.recipe, [*args.overrides, f"model.scan_layers={str(scan).lower()}"])
        for name in ("adamw", "muon"):
            row = {"optimizer": name, "scan_layers": scan, **time_update(cfg, name, args.repeat)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
