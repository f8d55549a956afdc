"""Sampling text from a model: greedy (temperature 0), temperature and top-k."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli import modelio, parallel
from bigmodel_cli.data.tokenizer import Tokenizer
from bigmodel_cli.errors import UserError


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token(graphdef, params, window, last, key, temperature, top_k):
    """Sample the token after position `last` of the [1, L] window."""
    logits = nnx.merge(graphdef, params)(window)[0, last]  # [V]
    greedy = jnp.argmax(logits)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    kth = jnp.sort(scaled)[::-1][jnp.clip(top_k - 1, 0, scaled.shape[0] - 1)]
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled)
    return jnp.where(temperature <= 0, greedy, sampled)


def sample(loaded: modelio.LoadedModel, prompt_ids: list[int], max_new_tokens: int, temperature: float,
           top_k: int, seed: int, eos_id: int | None = None) -> list[int]:
    """Continue prompt_ids; the context slides over the last max_seq_len tokens."""
    length = loaded.model_cfg.max_seq_len
    ids = list(prompt_ids)
    key = jax.random.key(seed)
    with parallel.activate(loaded.mesh):
        for i in range(max_new_tokens):
            context = ids[-length:]
            window = np.zeros((1, length), np.int32)  # right padding: causal attention never sees it
            window[0, : len(context)] = context
            token = int(_next_token(loaded.graphdef, loaded.params, window, len(context) - 1,
                                    jax.random.fold_in(key, i), temperature, top_k))
            ids.append(token)
            if eos_id is not None and token == eos_id:
                break
    return ids[len(prompt_ids):]


def run(model: Path, prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0,
        seed: int = 0) -> str:
    """Prompt + its continuation as text."""
    if max_new_tokens < 0 or temperature < 0 or top_k < 0:
        raise UserError("--max-new-tokens, --temperature and --top-k must not be negative")
    loaded = modelio.load(model)
    if not loaded.tokenizer_file.is_file():
        raise UserError(f"{loaded.home} has no tokenizer.model (trained on synthetic tokens?): nothing to decode")
    tokenizer = Tokenizer(loaded.tokenizer_file)
    prompt_ids = tokenizer.encode([prompt])[0] if prompt else [tokenizer.eos_id]
    new = sample(loaded, prompt_ids, max_new_tokens, temperature, top_k, seed, eos_id=tokenizer.eos_id)
    return prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id])
