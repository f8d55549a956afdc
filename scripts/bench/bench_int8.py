#!/usr/bin/env python3
"""int8 weight-only quantization (`--quantize int8`) against the unquantized model it came from.

    python scripts/bench/bench_int8.py runs/shakespeare_bpe --prompts 16 --new-tokens 64

On one trained model: validation perplexity of each (evaluate's own stage, --max-batches batches); greedy
agreement over --prompts prompts cut from the validation split (the share of generated tokens equal position by
position, and of continuations equal in full); weight bytes of the float32, bfloat16 and int8 parameter trees;
decode tokens/s of one prompt (best of --repeats, after a compile); and the compiled decoder's scratch memory
(temp bytes), which shows whether a float copy of all weights is held. XLA:CPU is set up as `generate` and
`evaluate` set it (host.cli_xla_flags). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigmodel_cli.host import cli_xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = cli_xla_flags(os.environ.get("XLA_FLAGS", ""), inference=True)

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bigmodel_cli import modelio, storage  # noqa: E402
from bigmodel_cli.data import loader  # noqa: E402
from bigmodel_cli.data.manifest import load_manifest  # noqa: E402
from bigmodel_cli.evaluate import lm  # noqa: E402
from bigmodel_cli.evaluate.generate import Sampling, _decode, generate_ids  # noqa: E402
from bigmodel_cli.model import quantize  # noqa: E402
from bigmodel_cli.utils import host_line  # noqa: E402


def _prompts(loaded, data_dir: Path, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of `count` validation windows spread over the split."""
    manifest = load_manifest(data_dir)
    windows = loader.TokenWindows(data_dir, "val", manifest, loaded.seq_len, loaded.model_cfg.vocab_size)
    picks = np.linspace(0, windows.count - 1, count).astype(int)
    return [windows.window(int(i))[:length].astype(np.int32).tolist() for i in picks]


def _decode_rate(loaded, prompt: list[int], new_tokens: int, repeats: int) -> float:
    sampling = Sampling(max_new_tokens=new_tokens, temperature=0)
    generate_ids(loaded, [prompt], sampling)  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate_ids(loaded, [prompt], sampling)
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def _decode_temp_bytes(loaded, prompt_len: int, new_tokens: int) -> int:
    """Scratch bytes of the compiled decoder for one prompt, as generate_ids compiles it."""
    compiled = _decode.lower(
        loaded.graphdef,
        loaded.params,
        np.zeros((1, prompt_len), np.int32),
        np.array([prompt_len], np.int32),
        jax.random.key(0),
        0.0,
        0,
        1.0,
        np.array([-1], np.int32),  # no stop token
        max_new_tokens=new_tokens,
        cache_len=prompt_len + new_tokens,
    ).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run directory, checkpoint, export or hf:DIR")
    parser.add_argument("--data", help="preprocessed data (default: the data the run was trained on)")
    parser.add_argument("--max-batches", type=int, default=0, help="perplexity batches of 8 (0 = the whole split)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    full = modelio.load(Path(args.model))
    int8 = quantize.int8(full)
    data_dir = storage.path(args.data) if args.data else storage.path(full.data_path)
    with tempfile.TemporaryDirectory() as out:  # evaluate's metrics.json, kept out of the run directory
        ppl = {
            mode or "float": lm.run(
                Path(args.model), data=data_dir, max_batches=args.max_batches, out=Path(out), quantize=mode
            )
            for mode in ("", "int8")
        }

    prompts = _prompts(full, data_dir, args.prompts, args.prompt_tokens)
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0)
    reference, quantized = generate_ids(full, prompts, sampling), generate_ids(int8, prompts, sampling)
    pairs = list(zip(reference, quantized, strict=True))
    equal_tokens = sum(a == b for r, q in pairs for a, b in zip(r, q, strict=True))

    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), full.params)
    bf16 = dataclasses.replace(full, params=bf16_params)
    weight_bytes = {
        "float32": quantize.weight_bytes(full.params),
        "bfloat16": quantize.weight_bytes(bf16_params),
        "int8": quantize.weight_bytes(int8.params),
    }
    rates = {
        name: _decode_rate(m, prompts[0], args.new_tokens, args.repeats)
        for name, m in (("float32", full), ("int8", int8))
    }
    temps = {
        name: _decode_temp_bytes(m, args.prompt_tokens, args.new_tokens)
        for name, m in (("float32", full), ("bfloat16", bf16), ("int8", int8))
    }
    cfg = full.model_cfg
    result = {
        "host": host_line(),
        "model": f"{args.model}: d={cfg.d_model} layers={cfg.n_layers} vocab={cfg.vocab_size} dtype={cfg.dtype}",
        "val_tokens": ppl["float"]["tokens"],
        "perplexity_float32": round(ppl["float"]["perplexity"], 4),
        "perplexity_int8": round(ppl["int8"]["perplexity"], 4),
        "perplexity_change_pct": round(100 * (ppl["int8"]["perplexity"] / ppl["float"]["perplexity"] - 1), 3),
        "greedy_token_agreement": round(equal_tokens / sum(len(r) for r in reference), 4),
        "greedy_identical_continuations": f"{sum(r == q for r, q in pairs)}/{len(prompts)}",
        "weight_bytes": weight_bytes,
        "int8_vs_float32": round(weight_bytes["int8"] / weight_bytes["float32"], 4),
        "int8_vs_bfloat16": round(weight_bytes["int8"] / weight_bytes["bfloat16"], 4),
        "decode_tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "decode_temp_bytes": temps,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
