"""Checking and showing the loss masks of encoded task examples (`finetune --show-examples`)."""

from __future__ import annotations

import functools

import numpy as np

from bigmodel_cli.errors import UserError


def check_masks(encoded: dict[str, np.ndarray]) -> None:
    """Raise a UserError when a finetuning batch (or set) trains on no token, or on every token."""
    weights = np.asarray(encoded["weights"])
    if weights.size == 0 or not weights.any():
        raise UserError(
            "the loss mask is all zeros, nothing would be trained: no target fits; raise data.seq_len or "
            "lower task.max_target_tokens"
        )
    if (weights > 0).all():
        raise UserError(
            "the loss mask is all ones, the prompt would be trained on too: the prompts are empty; check the "
            "task file and the [task] field names"
        )


def _decoded_runs(tokens: list[int], flags: list[bool], tokenizer) -> list[tuple[str, bool]]:
    """Text of each run of tokens with the same flag; EOS written ⟨eos⟩, other special tokens (which decoding
    leaves out, such as a chat template's <|im_start|>) written as they are spelled."""

    @functools.cache
    def special(token: int) -> bool:
        return token == tokenizer.eos_id or tokenizer.decode([token]) == ""

    runs: list[tuple[list[int], bool]] = []
    for token, flag in zip(tokens, flags, strict=True):
        if runs and runs[-1][1] == flag and not special(token) and not special(runs[-1][0][-1]):
            runs[-1][0].append(token)
        else:
            runs.append(([token], flag))
    out, plain, shown = [], [], ""
    for ids, flag in runs:
        if special(ids[0]):
            out.append(("⟨eos⟩" if ids[0] == tokenizer.eos_id else "".join(tokenizer.pieces(ids)), flag))
            continue
        # Decode the growing text and take the new part, so that word-start spaces survive between runs.
        plain += ids
        text = tokenizer.decode(plain)
        same = len(shown)
        while not text.startswith(shown[:same]):
            same -= 1
        out.append((text[same:], flag))
        shown = text
    merged: list[tuple[str, bool]] = []
    for text, flag in out:  # special tokens split the runs only for decoding: show one run per flag
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    return merged


def show_examples(encoded: dict[str, np.ndarray], tokenizer, n: int = 3) -> str:
    """The first n encoded rows as text, trained-on tokens inside ⟦...⟧ and EOS written ⟨eos⟩."""
    blocks = []
    for row in range(min(n, len(encoded["inputs"]))):
        tokens = [int(encoded["inputs"][row, 0]), *map(int, encoded["targets"][row])]
        trained = [False, *(float(w) > 0 for w in encoded["weights"][row])]
        end = len(tokens)
        while end > 1 and tokens[end - 1] == tokenizer.eos_id and not trained[end - 1]:
            end -= 1  # right padding
        body = "".join(
            f"⟦{text}⟧" if flag else text for text, flag in _decoded_runs(tokens[:end], trained[:end], tokenizer)
        )
        example = int(encoded["example_index"][row]) if "example_index" in encoded else row
        blocks.append(
            f"--- example {example}: {end} tokens, {sum(trained)} trained on (in ⟦...⟧), "
            f"{len(tokens) - end} padding\n{body}"
        )
    return "\n".join(blocks)
