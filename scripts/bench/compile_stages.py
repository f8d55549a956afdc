#!/usr/bin/env python3
"""Where one plan's compile time goes: tracing, lowering and XLA's compile of the real train step, timed apart,
and how many distinct kernels XLA:CPU compiled with LLVM (from its own log), for the settings given:
    python scripts/bench/compile_stages.py model.preset=1b model.n_layers=32 model.scan_layers=true
Builds the state and step as `bigmodel plan` does (the CLI's XLA flags, abstract arrays, one device, batch
1 x 512 tokens, vocabulary 32000, no compilation cache) and prints one JSON line. XLA:CPU compiles each distinct
fusion with LLVM and compiles identical ones once, so the kernel count is a measure of compile cost that other
processes on a shared host do not move.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bigmodel_cli.host import with_cpu_compile_flags  # noqa: E402

BASE = [
    "model.vocab_size=32000",
    "data.seq_len=512",
    "train.batch_size=1",
    "mesh.data=1",
    "mesh.fsdp=1",
    "mesh.tensor=1",
]
KERNEL_LINE = re.compile(r"Compiled LLVM module: (\S+) time: ([\d.]+) (us|ms|s)\b")


def stages(settings: list[str]) -> dict:
    """Seconds spent tracing, lowering and compiling plan's train step for the settings, in this process."""
    from bigmodel_cli import config as config_lib
    from bigmodel_cli import parallel
    from bigmodel_cli.plan import abstract_train_step

    cfg = config_lib.load_config(None, BASE + settings)
    step, state, batch, mesh = abstract_train_step(cfg, cfg.data.seq_len)
    with parallel.activate(mesh):
        started = time.perf_counter()
        traced = step.trace(state, batch)
        traced_at = time.perf_counter()
        lowered = traced.lower()
        lowered_at = time.perf_counter()
        lowered.compile()
        compiled_at = time.perf_counter()
    return {
        "trace_s": round(traced_at - started, 2),
        "lower_s": round(lowered_at - traced_at, 2),
        "compile_s": round(compiled_at - lowered_at, 2),
    }


def main() -> None:
    settings = sys.argv[1:]
    if os.environ.get("_COMPILE_STAGES_CHILD"):
        print(json.dumps(stages(settings)))
        return
    # XLA reads its logging settings when it starts: a child process with them set, whose log is parsed here.
    env = {**os.environ, "_COMPILE_STAGES_CHILD": "1", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "0"}
    env["XLA_FLAGS"] = with_cpu_compile_flags(os.environ.get("XLA_FLAGS", ""))  # as the CLI compiles
    env["TF_CPP_VMODULE"] = "ir_compiler=1"
    proc = subprocess.run([sys.executable, __file__, *settings], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    kernels = [(name, float(value) * unit[u]) for name, value, u in KERNEL_LINE.findall(proc.stderr)]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["llvm_kernels"] = len(kernels)  # the step's, and one or two of the small programs that build its state
    result["llvm_ms_summed"] = round(sum(ms for _, ms in kernels))  # over XLA's compile threads
    print(json.dumps({"set": settings, **result}))


if __name__ == "__main__":
    main()
