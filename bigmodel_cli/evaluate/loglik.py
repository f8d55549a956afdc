"""Batched log-likelihood of continuations after their prompts: the scoring behind label choice and multiple choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli.console import track

_MIN_WIDTH = 16  # the narrowest padded batch: short sequences share one compiled shape


def _fit(prompt: list[int], cont: list[int], length: int) -> list[int]:
    """prompt + cont in at most length + 1 tokens: the prompt loses its start first (lm-evaluation-harness's
    left truncation), a continuation longer than the model loses its end."""
    prompt = prompt[-max(1, length + 1 - len(cont)) :]
    return (prompt + cont)[: length + 1]


def _width(longest: int, length: int) -> int:
    """The padded width of a batch: the next power of two (few compiled shapes), at most length + 1."""
    return min(max(_MIN_WIDTH, 1 << (longest - 1).bit_length()), length + 1)


def logprobs(
    loaded, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8, progress: str = ""
) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation after its prompt, batched.

    Pairs whose tokens agree up to the continuation's last token (one prompt, one-token continuations such as
    " A" ... " D") share one sequence: its last position's distribution scores every last token, so their
    context is computed once. Sequences are padded per batch to a power of two, longest first."""
    length = loaded.model_cfg.max_seq_len
    model = nnx.merge(loaded.graphdef, loaded.params)

    @jax.jit
    def token_logprobs(tokens, last):  # tokens [B,W], last [B] -> [B,W-1] of the given tokens, [B,V] at `last`
        logp = jax.nn.log_softmax(model(tokens[:, :-1]), axis=-1)  # [B,W-1,V]
        given = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return given, jnp.take_along_axis(logp, last[:, None, None], axis=1)[:, 0]

    rows: dict[tuple[int, ...], int] = {}  # the shared part (all but the last token) -> its sequence
    sequences: list[list[int]] = []
    members = []  # per pair: (sequence, first scored position, last scored position, last token)
    for prompt, cont in pairs:
        if not cont:  # nothing to score
            members.append(None)
            continue
        seq = _fit(prompt, cont, length)
        start = len(seq) - min(len(cont), len(seq) - 1)  # the first continuation token's place
        key = tuple(seq[:-1])
        if key not in rows:
            rows[key] = len(sequences)
            sequences.append(seq)
        members.append((rows[key], start - 1, len(seq) - 2, seq[-1]))
    order = sorted(range(len(sequences)), key=lambda r: -len(sequences[r]))  # longest first, like the harness
    given_of: dict[int, np.ndarray] = {}
    last_of: dict[int, np.ndarray] = {}
    ends = {r: len(sequences[r]) - 2 for r in range(len(sequences))}
    starts = range(0, len(order), batch_size)
    for start in track(starts, progress, len(starts)) if progress else starts:
        chunk = order[start : start + batch_size]
        width = _width(len(sequences[chunk[0]]), length)
        tokens = np.zeros((batch_size, width), np.int32)
        last = np.zeros((batch_size,), np.int32)
        for i, r in enumerate(chunk):
            tokens[i, : len(sequences[r])] = sequences[r]
            last[i] = ends[r]
        given, at_last = token_logprobs(tokens, last)
        given, at_last = np.asarray(given), np.asarray(at_last)
        for i, r in enumerate(chunk):
            given_of[r], last_of[r] = given[i], at_last[i]
    out = []
    for member in members:
        if member is None:
            out.append((0.0, 0))
            continue
        r, first, end, token = member
        total = float(given_of[r][first:end].sum()) + float(last_of[r][token])
        out.append((total, end + 1 - first))
    return out
