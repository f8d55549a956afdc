"""`bigmodel inspect`: what a model looks at for one prompt. A forward pass that keeps every layer's attention
probabilities and residual stream, written as attention maps (a grid PNG, an HTML page, attention.npz) and as
the logit lens: the tokens each layer's residual stream would predict through the final norm and output head."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli import atomic, parallel, storage
from bigmodel_cli.data.tokenizer import AnyTokenizer
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate import inspect_views
from bigmodel_cli.evaluate.generate import _check_utf8, open_model

# Maps grow with the square of the prompt: [layers, heads, T, T] in the page, the PNG and attention.npz. 256
# tokens of a 24-layer, 14-head model is a 140 MB page already.
MAX_PROMPT_TOKENS = 256


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _forward(graphdef, params, tokens, *, top_k: int):
    """tokens [1,T] -> (attention [L,H,T,T], the logit lens's top-k probabilities and ids [L,T,k])."""
    model = nnx.merge(graphdef, params)
    _, probs, residuals = model.inspect(tokens)
    lens = [jax.lax.top_k(jax.nn.softmax(model.logits(r)[0], axis=-1), top_k) for r in residuals]  # [T,k] each
    lens_probs, lens_ids = (jnp.stack(parts) for parts in zip(*lens, strict=True))
    return jnp.stack([p[0] for p in probs]), lens_probs, lens_ids


def token_label(tokenizer: AnyTokenizer, token_id: int) -> str:
    """A token as a reader sees it: its own text, or its vocabulary piece when that text is empty (a special
    token) or only part of a character (a byte-level piece of a Chinese character)."""
    text = tokenizer.decode([token_id])
    return text if text and "\ufffd" not in text else tokenizer.pieces([token_id])[0]


def _candidates(tokenizer: AnyTokenizer, ids: np.ndarray, probs: np.ndarray) -> list[dict]:
    """[{"id", "token", "prob"}] of one position's top-k, likeliest first."""
    return [
        {"id": int(i), "token": token_label(tokenizer, int(i)), "prob": float(p)}
        for i, p in zip(ids, probs, strict=True)
    ]


def _check_out(out: Path) -> None:
    """--out can be made: fail before the model loads rather than after the forward pass."""
    if storage.is_url(out):
        return
    atomic.check_new_dir(out, "--out")
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --out {out}: {parent} is not a writable directory; choose another --out")


def run(model: Path, prompt: str, out: Path, *, top_k: int = 5) -> dict[str, Path]:
    """Write attention maps and the logit lens of `model` reading `prompt` into `out`; returns {what: path}."""
    _check_utf8("--prompt", prompt)
    if not prompt:
        raise UserError("--prompt is empty: pass the text whose attention to show")
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    _check_out(out)
    loaded, tokenizer, _ = open_model(model)
    ids = tokenizer.encode_prompt(prompt)  # as generate feeds a prompt: BOS where the tokenizer adds one
    window = loaded.model_cfg.max_seq_len
    if len(ids) > window:
        raise UserError(f"--prompt is {len(ids)} tokens, more than the model's {window} positions: shorten it")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise UserError(
            f"--prompt is {len(ids)} tokens; inspect draws at most {MAX_PROMPT_TOKENS} (the maps grow with the "
            "square of the prompt): shorten it"
        )
    top_k = min(top_k, loaded.model_cfg.vocab_size)
    with parallel.activate(loaded.mesh):
        outputs = _forward(loaded.graphdef, loaded.params, jnp.asarray([ids], jnp.int32), top_k=top_k)
    attention, lens_probs, lens_ids = (np.asarray(a) for a in outputs)
    labels = [token_label(tokenizer, i) for i in ids]
    lens = {
        "model": str(model),
        "prompt": prompt,
        "ids": ids,
        "tokens": labels,
        "top_k": top_k,
        # layers[l][t]: the k likeliest next tokens after position t, read from the residual stream after layer l
        "layers": [
            [_candidates(tokenizer, *position) for position in zip(layer_ids, layer_probs, strict=True)]
            for layer_ids, layer_probs in zip(lens_ids, lens_probs, strict=True)
        ],
    }
    with atomic.new_dir(out, "--out") as staging:
        np.savez_compressed(staging / "attention.npz", attention=attention, ids=np.asarray(ids))
        atomic.write_json(staging / "logit_lens.json", lens)
        inspect_views.grid_png(attention, labels, staging / "attention.png")
        atomic.write_text(staging / "index.html", inspect_views.page(attention, lens))
    out = storage.path(out)
    return {
        "attention maps": out / "attention.png",
        "page": out / "index.html",
        "probabilities": out / "attention.npz",
        "logit lens": out / "logit_lens.json",
    }
