"""Token layout of every task kind: Examples -> token windows whose loss covers the target, and the prompts that
generation starts from.

Every task is decoder-only text: a prompt, then the target the model learns to write, then EOS. A sequence is

    START  prompt  target  EOS  padding        (seq_len + 1 tokens, split into inputs/targets like pretraining)
    0      0...0   1...1   1    0...0          (loss weight of each token as a prediction target)

START is the BOS where the model's tokenizer adds one to a prompt (Llama's: a model from Hugging Face then
sees what transformers feeds it), else the EOS that ends every preprocessed document: either way, a
finetuning sequence starts the way every pretraining document did.

A task kind describes an example as text parts, each with a role (below). The prompt may hold one long, elastic
part (QA context, document, source sentence, classified text, the last user message of a chat). It is cut to fit
`seq_len - 1 - max_target_tokens`, so that training and generation see the same prompt and generation has room
for `max_target_tokens` new tokens; a windowed kind (qa) slides windows over it instead, so that the answer
stays inside the window trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bigmodel_cli.data.tokenizer import sequence_start
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks.options import TaskOptions, TaskWarning

# The role of each text part in the sequence.
PROMPT = "prompt"  # prompt text, never trained on
TRAINED = "trained"  # trained on, inside the prompt (earlier assistant turns of a chat)
CONTEXT = "context"  # the elastic part of the prompt: cut (or for a windowed kind, windowed) to fit
ANSWER = "answer"  # qa: the gold answer's occurrence inside the context, kept inside the training window
TARGET = "target"  # the final target: trained on, cut to max_target_tokens


Parts = list[tuple[str, str]]  # an example's full text (prompt + target) as (text, role) parts, in order


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:i] == b[:i] is monotone in i: binary search, comparing slices at C speed
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _tokenize_parts(tokenizer, texts: list[list[str]], chunk: int = 256) -> list[list[list[int]]]:
    """Token ids of every text part, cut so that the parts joined are exactly the tokenization of the text."""
    # Encoding each part alone would add a word-start marker to it and tokenize differently from the joined
    # text that generation encodes. So encode every prefix of the text and cut the full tokenization where
    # each prefix's tokenization departs from it; a token straddling a boundary goes to the later part.
    out = []
    for first in range(0, len(texts), chunk):
        prefixes = []
        for parts in texts[first : first + chunk]:
            joined = ""
            for text in parts:
                joined += text
                prefixes.append(joined)
        encoded = tokenizer.encode(prefixes)
        at = 0
        for parts in texts[first : first + chunk]:
            ids = encoded[at : at + len(parts)]
            at += len(parts)
            full, cuts, prev = ids[-1], [], 0
            for prefix in ids[:-1]:
                prev = max(prev, _common_prefix(prefix, full))
                cuts.append(prev)
            bounds = [0, *cuts, len(full)]
            out.append([full[bounds[k] : bounds[k + 1]] for k in range(len(parts))])
    return out


@dataclass
class _Layout:
    """One example's tokens: the prompt before the context, the context (cut or windowed), the prompt after
    it, and the target. Weights mark trained-on prompt tokens (earlier assistant turns of a chat)."""

    before: list[int] = field(default_factory=list)
    before_weights: list[float] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    answer: tuple[int, int] | None = None  # qa: the gold answer's token span inside `context`
    after: list[int] = field(default_factory=list)
    after_weights: list[float] = field(default_factory=list)
    target: list[int] = field(default_factory=list)


def _layouts(all_parts: Sequence[Parts], tokenizer) -> list[_Layout]:
    tokens = _tokenize_parts(tokenizer, [[text for text, _ in parts] for parts in all_parts])
    layouts = []
    for parts, ids in zip(all_parts, tokens, strict=True):
        layout, seen_context = _Layout(), False
        for (_, role), part in zip(parts, ids, strict=True):
            if role in (CONTEXT, ANSWER):
                seen_context = True
                if role == ANSWER:
                    # One token of margin on the right: a token straddling the answer's end went to the
                    # context after it, and must stay in the window too.
                    end = len(layout.context) + len(part) + 1
                    layout.answer = (len(layout.context), end)
                layout.context += part
            elif role == TARGET:
                layout.target = part
            else:
                tokens_, weights = (
                    (layout.after, layout.after_weights) if seen_context else (layout.before, layout.before_weights)
                )
                tokens_ += part
                weights += [float(role == TRAINED)] * len(part)
        if layout.answer:
            layout.answer = (layout.answer[0], min(layout.answer[1], len(layout.context)))
        layouts.append(layout)
    return layouts


def _eos(tokenizer) -> int:
    """The tokenizer's EOS id, which ends and pads every sequence (and starts it, without a BOS)."""
    if tokenizer.eos_id < 0:
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'path', '')} has no EOS token, which finetuning needs to mark where "
            "a target ends: use a tokenizer with one (every tokenizer bigmodel trains has it)"
        )
    return tokenizer.eos_id


def _check_room(seq_len: int, opts: TaskOptions) -> int:
    """The most prompt tokens (START included) that leave room for the target; a UserError if none."""
    room = seq_len - 1 - opts.max_target_tokens
    if room < 1:
        raise UserError(
            f"data.seq_len ({seq_len}) leaves no room for a prompt next to task.max_target_tokens "
            f"({opts.max_target_tokens}): raise data.seq_len or lower task.max_target_tokens"
        )
    return room


def _window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts of windows of `size` tokens every `stride` tokens over `length`, the last one ending at the end."""
    if length <= size or size <= 0:
        return [0]
    stride = min(stride, size)  # a stride wider than the window would skip context
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def _context_size(layout: _Layout, seq_len: int, opts: TaskOptions) -> int:
    """Context tokens that fit: seq_len minus START, the rest of the prompt and the target budget;
    negative when even the rest of the prompt does not fit."""
    room = seq_len - 1 - opts.max_target_tokens - len(layout.before) - len(layout.after)
    return min(room, len(layout.context))


def _train_start(layout: _Layout, size: int, opts: TaskOptions) -> int | None:
    """Where the context window trained on starts; None when the answer does not fit in `size` tokens."""
    if layout.answer is None:
        return 0  # keep the beginning (qa without an answer: the first window)
    a0, a1 = layout.answer
    if a1 - a0 > size:
        return None
    starts = _window_starts(len(layout.context), size, opts.doc_stride)
    holding = [s for s in starts if s <= a0 and a1 <= s + size]
    if not holding:  # an answer longer than the windows' overlap can straddle them all: centre one on it
        holding = [min(max(a0 - (size - (a1 - a0)) // 2, 0), len(layout.context) - size)]
    # Of the evaluation windows (a grid) holding the answer, the one with the most context around it.
    return max(holding, key=lambda s: min(a0 - s, s + size - a1))


def encode(
    parts: Sequence[Parts],
    trainable: Sequence[bool],
    tokenizer,
    seq_len: int,
    opts: TaskOptions,
    *,
    source: str = "",
    framed: bool = True,
) -> dict[str, np.ndarray]:
    """One [seq_len + 1] window per example (given as its parts) -> inputs, targets, weights [N, seq_len] and
    example_index [N]; examples not `trainable` are left out. Not `framed`: no EOS before the prompt or after
    the target, whose text writes its own markers (a model's chat template).

    Weights are 1 exactly where the predicted token belongs to the target or is the EOS after it (chats: every
    assistant turn), 0 on the prompt and on the right padding (EOS). Too-long contexts are cut at the end; QA
    trains on the context window that holds the answer with most room around it (unanswerable questions:
    the first window). Examples that cannot fit, and qa questions without an answer position, are left out,
    reported in one TaskWarning that starts with `source` (the file they came from); `example_index` says
    which example each row holds. Pass only inputs/targets/weights to the train step.
    """
    if not parts:
        raise UserError(f"no examples to encode: check the task data file {source}".rstrip())
    _check_room(seq_len, opts)
    where = f"{source}: " if source else ""
    # Only qa leaves examples out (a question whose answer has no trusted place), hence the wording below.
    placed = [i for i, ok in enumerate(trainable) if ok]
    if not placed:
        raise UserError(
            f"{where}no question has an answer whose answer_start points at its text in the context: training "
            "needs the answer's place; fix the answer_start values"
        )
    eos, first = _eos(tokenizer), sequence_start(tokenizer)
    windows = np.full((len(placed), seq_len + 1), eos, np.int32)  # padding: EOS, never trained on
    mask = np.zeros((len(placed), seq_len + 1), np.float32)  # 1 where the token is trained on
    index = []
    left_out = cut = 0
    for i, layout in zip(placed, _layouts([parts[i] for i in placed], tokenizer), strict=True):
        size = _context_size(layout, seq_len, opts)
        start = _train_start(layout, size, opts) if size >= 0 and (size or not layout.context) else None
        if start is None:
            left_out += 1
            continue
        target = layout.target[: opts.max_target_tokens]
        finished = len(target) == len(layout.target)  # a cut target must not teach the model to stop there
        cut += not finished
        context = layout.context[start : start + size]
        lead, end = [first] * framed, [eos] * (finished and framed)
        tokens = [*lead, *layout.before, *context, *layout.after, *target, *end]
        weights = [0.0] * len(lead) + [*layout.before_weights, *[0.0] * size, *layout.after_weights]
        weights += [1.0] * (len(target) + len(end))
        row = len(index)
        windows[row, : len(tokens)] = tokens
        mask[row, : len(weights)] = weights
        index.append(i)
    notes = []
    if len(placed) < len(parts):
        notes.append(
            f"{len(parts) - len(placed)} of {len(parts)} questions left out of training: none of their "
            "answers has an answer_start that points at its text in the context (evaluation still scores them)"
        )
    if left_out:
        notes.append(
            f"{left_out} of {len(parts)} examples left out: their prompt (qa: or answer) does not fit "
            f"data.seq_len={seq_len}"
        )
    if cut:
        notes.append(f"{cut} targets cut to task.max_target_tokens={opts.max_target_tokens}")
    if notes:
        warnings.warn(where + "; ".join(notes), TaskWarning, stacklevel=2)
    if not index:
        raise UserError(
            f"{where}no example fits data.seq_len={seq_len} with task.max_target_tokens={opts.max_target_tokens}: "
            "raise data.seq_len"
        )
    rows = len(index)
    # Position t predicts token t + 1, so the loss weight of position t is the mask of token t + 1.
    return {
        "inputs": windows[:rows, :-1],
        "targets": windows[:rows, 1:],
        "weights": mask[:rows, 1:],
        "example_index": np.asarray(index, np.int64),
    }


def generation_prompts(
    parts: Sequence[Parts], windowed: bool, tokenizer, seq_len: int, opts: TaskOptions, *, framed: bool = True
) -> list[list[list[int]]]:
    """Token ids to generate from, per example: [prompt], or for a too-long qa context one per window.

    A prompt is the training sequence up to the target (same tokens, same cut, START included), at
    most seq_len - max_target_tokens long so that max_target_tokens new tokens fit. For several qa windows,
    generate from each and keep the answer with the highest mean token log-probability among those that are
    not UNANSWERABLE (all unanswerable -> ""). Stop generating at EOS (chats: also at END_OF_TURN). A prompt
    too long even without its context keeps its last tokens, so every example gets an answer.
    """
    _eos(tokenizer)  # generation stops at EOS: refused without one, as in training
    first, limit = sequence_start(tokenizer), _check_room(seq_len, opts)
    out = []
    for layout in _layouts(parts, tokenizer):
        size = max(_context_size(layout, seq_len, opts), 0)
        starts = _window_starts(len(layout.context), size, opts.doc_stride) if windowed else [0]
        prompts = []
        for start in starts:
            tokens = [*layout.before, *layout.context[start : start + size], *layout.after]
            prompts.append([first] * framed + tokens[-limit:])
        out.append(prompts)
    return out
