#!/usr/bin/env python3
"""Decoding's bfloat16 matmul (model/matmul.py `_split_matmul`) against converting the kernel to float32 first.

    python scripts/bench/bench_split_matmul.py [--repeats 50]

One MLP kernel of Qwen2.5-0.5B's shape ([896, 4864], bfloat16) times float32 activations of 1 token (a decode
step) and 16 tokens (a short prefill), jitted, as `matmul` computes it with and without Transformer.decode's
DECODING set. Prints, per token count, milliseconds for each path (median of --repeats) and the relative error
of the split path against the converted one (largest difference over the largest magnitude).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bigmodel_cli.model import matmul  # noqa: E402
from bigmodel_cli.utils import describe_host  # noqa: E402


def median_ms(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((896, 4864)) * 0.02, jnp.bfloat16)
    converted = jax.jit(lambda x, w: matmul.matmul(x, w, None))

    def split_path(x, w):
        token = matmul.DECODING.set(True)  # traced as Transformer.decode traces it
        try:
            return matmul.matmul(x, w, None)
        finally:
            matmul.DECODING.reset(token)

    split = jax.jit(split_path)
    host = describe_host()
    result = {"host": host["isa"], "cores": host["cores"], "rows": []}
    for tokens in (1, 16):
        x = jnp.asarray(rng.standard_normal((tokens, 896)), jnp.float32)
        reference, fast = converted(x, kernel), split(x, kernel)
        result["rows"].append(
            {
                "tokens": tokens,
                "converted_ms": round(median_ms(converted, x, kernel, repeats=args.repeats), 3),
                "split_ms": round(median_ms(split, x, kernel, repeats=args.repeats), 3),
                "relative_error": float(jnp.abs(fast - reference).max() / jnp.abs(reference).max()),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
