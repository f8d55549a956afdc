"""Instruction following and chat: Alpaca {instruction, input, output} records, OpenAI-style {messages: [{role,
content}]} chats and ShareGPT {conversations: [{from, value}]} chats, in a JSON list or JSONL.

A chat is rendered with the model's own chat template (its tokenizer's `chat_template`; bigmodel's built-in
format for a model without one), and the loss falls on every assistant reply and the marker that ends its turn,
nothing else. The template depends on the model, so the text parts are made when encoding, not when reading;
an Example's prompt and target show the chat in the built-in format. There is no single right reply to score,
so evaluation reports the loss and perplexity of the references instead of predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import layout
from bigmodel_cli.tasks import records as R
from bigmodel_cli.tasks.base import EvalSettings, Predictor, Task
from bigmodel_cli.tasks.chat import CHAT_TEMPLATE, END_OF_TURN, ROLES, ChatFormat, chat_format
from bigmodel_cli.tasks.options import Example, TaskOptions

# ShareGPT's speakers (`from`) as chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _message(where: str, role, content) -> dict:
    """One checked {role, content} message."""
    if role not in ROLES or not isinstance(content, str):
        got = f"{role!r}: {content!r}"[:200]
        raise UserError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a text content, got {got}")
    return {"role": role, "content": content}


def _turns(where: str, record: dict, name: str, keys: tuple[str, str]) -> list:
    """A chat record's list of turns under `name`, each an object holding `keys`."""
    turns = record[name]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise UserError(f"{where}: {name!r} must be a list of {{{', '.join(keys)}}} objects")
    return turns


def _chat_messages(where: str, record: dict) -> list[dict]:
    """A record's chat as checked {role, content} messages: its messages, its ShareGPT conversation, or an
    Alpaca record turned into a user message and a reply."""
    if "messages" in record:
        return [
            _message(where, m.get("role"), m.get("content"))
            for m in _turns(where, record, "messages", ("role", "content"))
        ]
    if "conversations" in record:
        turns = _turns(where, record, "conversations", ("from", "value"))
        for t in turns:
            if not isinstance(t.get("from"), str) or t["from"] not in SHAREGPT_ROLES:
                raise UserError(
                    f"{where}: each ShareGPT turn needs a 'from' of {', '.join(SHAREGPT_ROLES)}, got {t!r}"[:300]
                )
        return [_message(where, SHAREGPT_ROLES[t["from"]], t.get("value")) for t in turns]
    for name in ("instruction", "output"):
        if name not in record:
            raise UserError(
                f"{where}: no field {name!r}: instruct records are Alpaca {{instruction, input, output}}, "
                "chats {messages: [{role, content}]} or ShareGPT {conversations: [{from, value}]}"
            )
    prompt = R.text(record["instruction"])
    if R.text(record.get("input")):
        prompt += "\n\n" + R.text(record["input"])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": R.text(record["output"])}]


class Instruct(Task):
    name = "instruct"
    keyed_by_id = False

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
        records = R.json_records(path, "instruction", "a JSON list of Alpaca records or chats")
        builtin = ChatFormat(CHAT_TEMPLATE)
        examples = []
        skipped = R.Skipped(path, "records")
        for number, (where, record) in enumerate(records, start=1):
            rid = R.text(record.get("id")) or str(number)
            messages = _chat_messages(where, record)
            replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            alpaca = "messages" not in record and "conversations" not in record
            if alpaca and not R.text(record["instruction"]):
                skipped.add(rid, "an empty instruction")
                continue
            if not replies or not messages[replies[-1]]["content"].strip():
                skipped.add(rid, "an empty output" if alpaca else "no (non-empty) assistant reply")
                continue
            messages = messages[: replies[-1] + 1]  # what follows the last reply is never trained on
            reply = messages[-1]["content"]
            examples.append(
                Example(
                    task=self.name,
                    id=rid,
                    prompt=builtin.render(messages[:-1], add_generation_prompt=True),
                    target=reply + END_OF_TURN,
                    references=(reply,),
                    meta={"messages": messages},
                )
            )
        skipped.report(info)
        return examples

    def chat_template(self, tokenizer) -> str:
        return chat_format(tokenizer).template

    def chat_parts(self, examples: Sequence[Example], tokenizer, source: str = "") -> tuple[list, bool]:
        """Each example's text parts in the tokenizer's chat format, and whether that format adds EOS framing."""
        fmt = chat_format(tokenizer)
        where = f"{source}: example" if source else "example"
        return [fmt.parts(e.meta["messages"], where=f"{where} {e.id}") for e in examples], fmt.builtin

    def encode(
        self, examples: Sequence[Example], tokenizer, seq_len: int, opts: TaskOptions, *, source: str = ""
    ) -> dict[str, np.ndarray]:
        """Training windows of the chats as the model's template renders them: see layout.encode."""
        parts, framed = self.chat_parts(examples, tokenizer, source)
        return layout.encode(parts, [True] * len(parts), tokenizer, seq_len, opts, source=source, framed=framed)

    def generation_prompts(
        self, examples: Sequence[Example], tokenizer, seq_len: int, opts: TaskOptions
    ) -> list[list[list[int]]]:
        """Token ids of each chat up to its last reply: see layout.generation_prompts."""
        parts, framed = self.chat_parts(examples, tokenizer)
        return layout.generation_prompts(parts, self.windowed, tokenizer, seq_len, opts, framed=framed)

    def predict(self, examples: Sequence[Example], labels: Sequence[str], model: Predictor) -> None:
        """None: a chat is scored by the loss of its reference replies."""
        return None

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        raise UserError(f"--predictions is not supported for --task {self.name}: it is scored by loss and perplexity")
