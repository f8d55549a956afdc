#!/usr/bin/env python3
"""KV-cache decoding against recomputing the whole sequence for every new token.

    python scripts/bench/bench_generate.py --preset 35m --new-tokens 512 --prompt 16
Both produce greedy tokens from the same random-weight model; the script checks they are identical and
reports tokens/s of each and the speed-up. --recompute-tokens N times only the first N recompute steps
(the cost of a recompute step grows with the sequence, so the estimate for all steps is a lower bound).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bigmodel_cli import parallel  # noqa: E402
from bigmodel_cli.config import PRESETS, MeshConfig, ModelConfig  # noqa: E402
from bigmodel_cli.evaluate.generate import Sampling, generate_ids  # noqa: E402
from bigmodel_cli.model.transformer import Transformer  # noqa: E402
from bigmodel_cli.modelio import LoadedModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="35m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--recompute-tokens", type=int, default=0, help="0 = all of them")
    args = parser.parse_args()
    length = args.prompt + args.new_tokens
    cfg = ModelConfig(**{**PRESETS[args.preset], "vocab_size": args.vocab, "max_seq_len": length, "init_std": 0.1})
    mesh = parallel.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    loaded = LoadedModel(cfg, graphdef, nnx.to_pure_dict(state), mesh, None, 0, length, "")
    prompt = np.random.default_rng(0).integers(0, args.vocab, args.prompt).tolist()
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0)

    generate_ids(loaded, [prompt], sampling)  # compile
    t0 = time.perf_counter()
    cached = generate_ids(loaded, [prompt], sampling)[0]
    cached_s = time.perf_counter() - t0

    @jax.jit
    def next_token(params, window, last):  # the whole fixed-length window, every step
        return jnp.argmax(nnx.merge(graphdef, params)(window)[0, last])

    window = np.zeros((1, length), np.int32)
    window[0, : len(prompt)] = prompt
    next_token(loaded.params, window, len(prompt) - 1).block_until_ready()  # compile
    steps = args.recompute_tokens or args.new_tokens
    ids = list(prompt)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = int(next_token(loaded.params, window, len(ids) - 1))
        window[0, len(ids)] = token
        ids.append(token)
    recompute_s = (time.perf_counter() - t0) * args.new_tokens / steps
    same = ids[len(prompt) :] == cached[:steps]
    result = {
        "preset": args.preset,
        "params_m": round(sum(x.size for x in jax.tree.leaves(loaded.params)) / 1e6, 1),
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "kv_cache_s": round(cached_s, 2),
        "kv_cache_tokens_per_s": round(args.new_tokens / cached_s, 1),
        "recompute_s": round(recompute_s, 2),
        "recompute_tokens_per_s": round(args.new_tokens / recompute_s, 1),
        "recompute_steps_timed": steps,
        "speedup": round(recompute_s / cached_s, 1),
        "identical_greedy_tokens": same,
    }
    print(json.dumps(result))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
