"""Instruction following and chat: Alpaca {instruction, input, output} records or {messages: [...]} chats.

    prompt  render_chat(messages before the reply, add_generation_prompt=True)     target  "{reply}<|end|>"

Every assistant turn is trained on. There is no single right reply to score, so evaluation reports the loss
and perplexity of the references instead of predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import records as R
from bigmodel_cli.tasks.base import EvalSettings, Predictor, Task
from bigmodel_cli.tasks.chat import CHAT_TEMPLATE, END_OF_TURN, ROLES, render_chat
from bigmodel_cli.tasks.layout import CONTEXT, PROMPT, TARGET, TRAINED
from bigmodel_cli.tasks.options import Example, TaskOptions


def _chat_messages(where: str, record: dict) -> list[dict]:
    """A chat record's messages, checked; or an Alpaca record turned into a user/assistant exchange."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        out = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(
                    f"{where}: each message needs a role ({', '.join(ROLES)}) and a text content, got {m!r}"[:300]
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out
    for name in ("instruction", "output"):
        if name not in record:
            raise UserError(
                f"{where}: no field {name!r}: instruct records are Alpaca {{instruction, input, output}} "
                "or chat {messages: [{role, content}]}"
            )
    prompt = R.text(record["instruction"])
    if R.text(record.get("input")):
        prompt += "\n\n" + R.text(record["input"])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": R.text(record["output"])}]


class Instruct(Task):
    name = "instruct"
    chat_template = CHAT_TEMPLATE

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
        if R.file_kind(path) == "jsonl":
            records = R.read_jsonl(path, "instruction")
        else:
            data = R.read_json(path, "instruction JSON")
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{path}: expected a JSON list of Alpaca records {{instruction, input, output}}")
            records = [(f"{path} record {i}", r) for i, r in enumerate(data, start=1)]
        examples = []
        skipped = R.Skipped(path, "records")
        for number, (where, record) in enumerate(records, start=1):
            rid = R.text(record.get("id")) or str(number)
            messages = _chat_messages(where, record)
            replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            alpaca = "messages" not in record
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
                    prompt=render_chat(messages[:-1], add_generation_prompt=True),
                    target=reply + END_OF_TURN,
                    references=(reply,),
                    meta={"messages": messages},
                )
            )
        skipped.report(info)
        return examples

    def parts(self, example: Example) -> list[tuple[str, str]]:
        """The chat as rendered; the last user message is the part cut to fit, earlier replies are trained on."""
        messages = example.meta["messages"]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        parts = []
        for i, m in enumerate(messages):
            parts.append((("\n" if i else "") + f"<|{m['role']}|>\n", PROMPT))
            if m["role"] != "assistant":
                parts += [(m["content"], CONTEXT if i == last_user else PROMPT), (END_OF_TURN, PROMPT)]
            else:
                parts.append((m["content"] + END_OF_TURN, TARGET if i == len(messages) - 1 else TRAINED))
        return parts

    def predict(self, examples: Sequence[Example], labels: Sequence[str], model: Predictor) -> None:
        """None: a chat is scored by the loss of its reference replies."""
        return None

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        raise UserError(f"--predictions is not supported for --task {self.name}: it is scored by loss and perplexity")
