#!/usr/bin/env python3
"""bigmodel's own train step on one accelerator: tokens/s and MFU per attention implementation and layer layout.

On a GPU (the prepared check for the H200):
    python scripts/bench/gpu_bench.py --preset 1b --seq 2048 --batch 8 --steps 10 --attention xla,cudnn --scan on,off
On CPU, to check the path end to end in seconds (what the tests run):
    python scripts/bench/gpu_bench.py --dry-run
Prints one JSON line per (attention, scan) point and a summary table; --out also writes them as one JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigmodel_cli import parallel  # noqa: E402
from bigmodel_cli.config import PRESETS, Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from bigmodel_cli.data.loader import SyntheticBatches  # noqa: E402
from bigmodel_cli.model.sizing import count_params, flops_per_token  # noqa: E402
from bigmodel_cli.train.state import jit_train_step, make_state  # noqa: E402
from bigmodel_cli.utils import device_peak_flops  # noqa: E402


def measure(
    preset: str,
    seq: int,
    batch: int,
    steps: int,
    attention: str,
    dtype: str,
    remat: str,
    vocab: int = 32000,
    scan: bool | None = None,
) -> dict:
    """One point: scan None keeps the preset's layout."""
    overrides = {"vocab_size": vocab, "max_seq_len": seq, "dtype": dtype, "attention": attention}
    if scan is not None:
        overrides["scan_layers"] = scan
    model = ModelConfig(**{**PRESETS[preset], **overrides})
    cfg = Config(
        model=model,
        optim=OptimConfig(lr=3e-4, warmup_steps=10),
        train=TrainConfig(steps=steps + 2, batch_size=batch, remat=remat),
        mesh=MeshConfig(data=1),
    )
    mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    graphdef, tx, state = make_state(cfg, mesh)
    step = jit_train_step(graphdef, tx, 1, state, mesh)
    batches = SyntheticBatches(model.vocab_size, seq, batch, seed=0)
    sharding = parallel.batch_sharding(mesh)
    t0 = time.perf_counter()
    with parallel.activate(mesh):
        compiled = step.lower(state, {k: jax.device_put(v, sharding) for k, v in batches(0).items()}).compile()
    compile_s = time.perf_counter() - t0
    times = []
    with parallel.activate(mesh):
        for i in range(steps + 2):
            batch_i = {k: jax.device_put(v, sharding) for k, v in batches(i).items()}
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch_i)
            loss = float(metrics["loss"])
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[2:]))
    tokens = batch * seq
    flops = flops_per_token(model, seq) * tokens
    peak = device_peak_flops(dtype)
    return {
        "device": jax.devices()[0].device_kind,
        "preset": preset,
        "params": count_params(model)[0],
        "seq": seq,
        "batch": batch,
        "dtype": dtype,
        "attention": attention,
        "scan_layers": model.scan_layers,
        "remat": remat,
        "compile_s": round(compile_s, 1),
        # XLA's own figure for the step's scratch memory (activations kept for the backward pass, mostly)
        "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3),
        "step_ms": round(step_s * 1e3, 1),
        "tokens_per_s": round(tokens / step_s),
        "model_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak,
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attention", default="xla,cudnn", help="comma-separated: auto, chunked, xla, cudnn")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--remat", default="none", choices=["none", "dots", "full"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--scan", default="preset", help="comma-separated: on, off, preset (the preset's layout)")
    parser.add_argument("--out", type=Path, help="also write every point, with the versions, as one JSON file")
    parser.add_argument("--dry-run", action="store_true", help="tiny config on whatever device: checks the path")
    args = parser.parse_args()
    if args.dry_run:
        args.preset, args.seq, args.batch, args.steps, args.attention, args.dtype = "tiny", 64, 4, 2, "xla", "float32"
        args.vocab, args.scan = 512, "on,off"
    layouts = {"on": True, "off": False, "preset": None}
    scans = [word.strip() for word in args.scan.split(",")]
    if unknown := [word for word in scans if word not in layouts]:
        parser.error(f"--scan takes on, off or preset, not {', '.join(unknown)}")
    results = []
    for attention in [name.strip() for name in args.attention.split(",")]:
        for scan in scans:
            try:
                result = measure(
                    args.preset,
                    args.seq,
                    args.batch,
                    args.steps,
                    attention,
                    args.dtype,
                    args.remat,
                    args.vocab,
                    layouts[scan],
                )
            except Exception as err:  # e.g. cudnn attention unavailable for this shape or device: report, go on
                result = {
                    "attention": attention,
                    "scan_layers": layouts[scan],
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                }
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        import flax
        import jaxlib

        versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}
        args.out.write_text(json.dumps({"versions": versions, "results": results}, indent=1) + "\n")
    print(
        f"\n{'attention':<10} {'scan':<6} {'compile s':>9} {'temp GiB':>8} {'step ms':>9} {'tokens/s':>10} "
        f"{'TFLOP/s':>8} {'MFU':>6}"
    )
    for r in results:
        scan = {True: "on", False: "off", None: "preset"}[r["scan_layers"]]
        if "error" in r:
            print(f"{r['attention']:<10} {scan:<6} {r['error']}")
        else:
            print(
                f"{r['attention']:<10} {scan:<6} {r['compile_s']:>9} {r['temp_gib']:>8} {r['step_ms']:>9} "
                f"{r['tokens_per_s']:>10} "
                f"{r['model_tflops']:>8.1f} {100 * r['mfu']:>5.1f}%"
            )
    if all("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
