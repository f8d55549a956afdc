"""Preference pairs: a prompt with a chosen and a rejected completion, in the layouts TRL reads, in JSONL or a
JSON list:

    {"prompt": "text", "chosen": "text", "rejected": "text"}                          plain text
    {"prompt": [{role, content}...], "chosen": [{role: assistant...}], "rejected": [...]}   a chat
    {"chosen": [whole chat], "rejected": [whole chat]}                                    the prompt is the shared start
    {"chosen": "whole text", "rejected": "whole text"}     Anthropic HH: the prompt is the shared start, as TRL cuts it

(`messages` may name the prompt's chat; a chat's completion may also be a plain string, the assistant's reply.)
A chat is rendered with the model's chat template, as TRL renders it: the prompt with the generation prompt,
then prompt + completion; the completion's tokens are where the two tokenizations part. Plain text is the
prompt, then prompt + completion followed by EOS, starting as every bigmodel sequence starts (layout.py).

A pair with an empty chosen or rejected completion, or two identical ones, teaches nothing and is skipped with
a count; so is a pair whose prompt fills the window, which TRL drops too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bigmodel_cli.data.tokenizer import sequence_start
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import layout
from bigmodel_cli.tasks import records as R
from bigmodel_cli.tasks.base import EvalSettings, Predictor, Task
from bigmodel_cli.tasks.chat import chat_format
from bigmodel_cli.tasks.instruct import _message
from bigmodel_cli.tasks.options import Example, TaskOptions, TaskWarning

SIDES = ("chosen", "rejected")


def _messages(where: str, value, name: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise UserError(f"{where}: {name!r} must be a string or a list of {{role, content}} messages")
    return [_message(where, m.get("role"), m.get("content")) for m in value]


def _pair(where: str, record: dict) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen, rejected) of a record: three strings, or three lists of messages."""
    for name in SIDES:
        if name not in record:
            raise UserError(
                f"{where}: no field {name!r}: preference records are {{prompt, chosen, rejected}} (strings, or "
                "lists of {role, content} messages)"
            )
    prompt = record.get("prompt", record.get("messages"))
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(prompt, str) or (prompt is None and isinstance(chosen, str)):
        if not all(isinstance(v, str) for v in (chosen, rejected)):
            raise UserError(f"{where}: a text pair needs a string prompt (or none), chosen and rejected")
        return (prompt, chosen, rejected) if prompt is not None else _shared_start(chosen, rejected)
    sides = [
        [{"role": "assistant", "content": v}] if isinstance(v, str) else _messages(where, v, name)
        for name, v in zip(SIDES, (chosen, rejected), strict=True)
    ]
    if prompt is None:  # implicit prompt: the messages both chats share
        shared = 0
        while shared < min(map(len, sides)) - 1 and sides[0][shared] == sides[1][shared]:
            shared += 1
        return sides[0][:shared], sides[0][shared:], sides[1][shared:]
    return _messages(where, prompt, "prompt"), sides[0], sides[1]


def _shared_start(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic HH's layout, two whole texts: the prompt is where they start alike, up to the first character in
    which they differ, less a space before it (which stays with the completions), as TRL's extract_prompt cuts."""
    cut = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), None)
    if cut is None:  # one is the other's start: TRL's loop ends on the shorter one's last character
        cut = min(len(chosen), len(rejected)) - 1
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _text(side: str | list) -> str:
    return side if isinstance(side, str) else "".join(m["content"] for m in side)


class Preference(Task):
    name = "preference"
    pairs = True

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
        records = R.json_records(path, "preference", "JSONL or a JSON list of {prompt, chosen, rejected} records")
        skipped = R.Skipped(path, "pairs")
        examples = []
        for number, (where, record) in enumerate(records, start=1):
            rid = R.text(record.get("id")) or str(number)
            prompt, chosen, rejected = _pair(where, record)
            if not _text(chosen).strip() or not _text(rejected).strip():
                skipped.add(rid, "an empty chosen or rejected completion")
                continue
            if chosen == rejected:
                skipped.add(rid, "identical chosen and rejected completions")
                continue
            examples.append(
                Example(
                    task=self.name,
                    id=rid,
                    prompt=_text(prompt),
                    target=_text(chosen),
                    references=(_text(chosen),),
                    meta={"prompt": prompt, "chosen": chosen, "rejected": rejected},
                )
            )
        skipped.report(info)
        return examples

    def chat_template(self, tokenizer) -> str:
        return chat_format(tokenizer).template

    def encode(
        self, examples: Sequence[Example], tokenizer, seq_len: int, opts: TaskOptions, *, source: str = ""
    ) -> dict[str, np.ndarray]:
        """Each pair as two [seq_len] rows (chosen_inputs/targets/weights, rejected_...; weights 1 on the
        completion's tokens) and example_index [N]; pairs that cannot be trained on are left out with a count."""
        eos, start = layout._eos(tokenizer), sequence_start(tokenizer)
        fmt = chat_format(tokenizer)
        windows = np.full((len(examples), 2, seq_len + 1), eos, np.int32)
        masks = np.zeros((len(examples), 2, seq_len + 1), np.float32)
        index, too_long, same, cut = [], 0, 0, 0
        for i, example in enumerate(examples):
            prompt, sides = example.meta["prompt"], [example.meta[side] for side in SIDES]
            if isinstance(prompt, str) or fmt.builtin:  # framed as every bigmodel sequence: START ... EOS
                texts = [_render(fmt, prompt, add_generation_prompt=True)]
                texts += [_render(fmt, prompt, side) for side in sides]
                prompt_ids, *full = ([start, *ids] for ids in tokenizer.encode(texts))
                full = [ids + [eos] for ids in full]
            else:  # the template writes every marker: nothing added, as transformers' apply_chat_template
                where = f"{source}: pair {example.id}" if source else f"pair {example.id}"
                texts = [fmt.render(prompt, add_generation_prompt=True, where=where)]
                texts += [fmt.render([*prompt, *side], where=where) for side in sides]
                prompt_ids, *full = tokenizer.encode(texts)
            # The completions start where the prompt's tokens and each whole sequence's part (as TRL cuts them).
            shared = min(layout._common_prefix(prompt_ids, ids) for ids in full)
            if shared >= seq_len:  # not one completion token fits the window
                too_long += 1
                continue
            if full[0] == full[1] or any(len(ids) <= shared for ids in full):
                same += 1
                continue
            row = len(index)
            for side, ids in enumerate(full):
                kept = ids[: seq_len + 1]
                cut += len(kept) < len(ids)
                windows[row, side, : len(kept)] = kept
                masks[row, side, shared : len(kept)] = 1.0
            index.append(i)
        where = f"{source}: " if source else ""
        notes = []
        if too_long:
            notes.append(f"{too_long} of {len(examples)} pairs left out: their prompt fills data.seq_len={seq_len}")
        if same:
            notes.append(
                f"{same} of {len(examples)} pairs left out: chosen and rejected tokenize the same, or one to nothing"
            )
        if cut:
            notes.append(f"{cut} completions cut to fit data.seq_len={seq_len}")
        if notes:
            warnings.warn(where + "; ".join(notes), TaskWarning, stacklevel=2)
        if not index:
            raise UserError(
                f"{where}no preference pair fits data.seq_len={seq_len} with a completion token to train on: "
                "raise data.seq_len or shorten the prompts"
            )
        rows = len(index)
        out = {"example_index": np.asarray(index, np.int64)}
        for side, name in enumerate(SIDES):  # position t predicts token t + 1, as in layout.encode
            out[f"{name}_inputs"] = windows[:rows, side, :-1]
            out[f"{name}_targets"] = windows[:rows, side, 1:]
            out[f"{name}_weights"] = masks[:rows, side, 1:]
        return out

    def predict(self, examples: Sequence[Example], labels: Sequence[str], model: Predictor) -> None:
        return None

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        raise UserError("--predictions is not supported for --task preference: it is scored by log-likelihoods")


def _render(fmt, prompt: str | list, completion: str | list | None = None, add_generation_prompt=False) -> str:
    """Plain text prompt (+ completion), or a chat in bigmodel's built-in format."""
    if isinstance(prompt, str):
        return prompt + (completion if completion is not None else "")
    if completion is None:
        return fmt.render(prompt, add_generation_prompt=add_generation_prompt)
    return fmt.render([*prompt, *completion])
