"""Chat formats: a model's own Jinja chat template, rendered exactly as transformers' `apply_chat_template`
renders it, or bigmodel's built-in format for models without one; and where each assistant reply (with the
marker that ends its turn) lies in a rendered conversation, so that the loss falls on the replies alone.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks.layout import CONTEXT, PROMPT, TARGET, TRAINED, Parts

END_OF_TURN = "<|end|>"  # ends every message of the built-in format
ROLES = ("system", "user", "assistant")

# bigmodel's own chat format, for models without a template: "<|role|>\n{content}<|end|>" per message, joined
# by newlines; the generation prompt opens an assistant message. Plain text, so any tokenizer encodes it
# without special tokens. The newlines are Jinja expressions: transformers renders with trim_blocks, which
# drops a literal newline that follows a block tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}<|assistant|>{{ '\\n' }}{% endif %}"
)
# The same format as task.json files recorded it before: transformers (trim_blocks) renders this text without
# the newlines those models were trained with, so reading it means CHAT_TEMPLATE.
_OLD_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}\n{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}\n{% endif %}<|assistant|>\n{% endif %}"
)

# The tokenizer's special-token strings that transformers hands a template (those the tokenizer has).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# A conversation whose rendering shows what ends an assistant turn (no template trims or rejects it).
_PROBE = (("user", "Question1"), ("assistant", "Reply1"), ("user", "Question2"), ("assistant", "Reply2"))


# The built-in format as exports write it for transformers and llama.cpp. Its sequences start with EOS, which
# bigmodel puts first as a token; there the template writes it, and the export reads special-token text as the
# tokens (hf.py), so that apply_chat_template gives the ids bigmodel trained and chats on.
EXPORTED_CHAT_TEMPLATE = "{{ eos_token }}" + CHAT_TEMPLATE


def exported_template(template: str) -> str:
    """The chat template an export writes: EXPORTED_CHAT_TEMPLATE for the built-in format, else the template."""
    return EXPORTED_CHAT_TEMPLATE if template == CHAT_TEMPLATE else template


def stored_template(text: str) -> str:
    """A template as a model directory recorded it (an export, an older run), read as today's text of the same
    format."""
    return CHAT_TEMPLATE if text in (_OLD_CHAT_TEMPLATE, EXPORTED_CHAT_TEMPLATE) else text


# ---- rendering as transformers does ---------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which templates written for transformers' assistant masks use
    around replies: it renders its body unchanged (the replies' places are found by rendering prefixes)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _Refused(jinja2.TemplateError):
    """What a template's raise_exception(message) raises: it refuses the conversation."""


def _raise_exception(message: str):
    raise _Refused(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON (as transformers gives them).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # Templates come from model repositories: untrusted code, hence the sandbox. The whitespace settings and
    # the helpers are the ones transformers gives every chat template.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(
            f"the chat template is not valid Jinja (line {err.lineno}: {err.message}): fix the model's chat_template"
        ) from None


@dataclass(frozen=True)
class ChatFormat:
    """A chat template with the special-token strings it may use: renders conversations and finds the replies."""

    template: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, text) of the tokenizer's special tokens

    @property
    def builtin(self) -> bool:
        """bigmodel's own format: sequences start with EOS, as pretraining documents did, and a reply ends
        with <|end|> then EOS. A model's own template writes every marker itself, and nothing is added."""
        return self.template == CHAT_TEMPLATE

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, where: str = "") -> str:
        """The conversation as text: `tokenizer.apply_chat_template(messages, tokenize=False, ...)`."""
        try:
            return _compile(self.template).render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **dict(self.special_tokens),
            )
        except _Refused as err:
            raise UserError(f"{_at(where)}the chat template refused the conversation: {err}: fix the data") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
            raise UserError(
                f"{_at(where)}the chat template failed on the conversation ({type(err).__name__}: {err}): fix the "
                "data or the template"
            ) from None

    @functools.cached_property
    def end_of_turn(self) -> str:
        """The text the template writes right after an assistant reply: the reply's end, where generation stops."""
        probe = [{"role": role, "content": text} for role, text in _PROBE]
        full = self.render(probe, where="a conversation showing how a turn ends")
        first, last = full.find("Reply1"), full.rfind("Reply2")
        if not 0 <= first < last:
            raise UserError("the chat template does not write the assistant's replies as given: check the template")
        after_first = full[first + len("Reply1") :]  # what follows a reply that more turns follow
        after_last = full[last + len("Reply2") :]  # what follows the conversation's last reply
        common = os.path.commonprefix([after_first, after_last])
        if common not in (after_first, after_last):  # "<|end|>\n<|user|>" and "<|end|>\n<|endoftext|>" share "<|"
            common = common[: max(common.rfind(c) for c in " \n\t") + 1]
        marker = common.strip()
        if not marker:
            raise UserError(
                "the chat template writes nothing after an assistant reply, so a model could not learn where a "
                "reply ends: use a template that closes each turn (such as with eos_token)"
            )
        return marker

    def encode(self, tokenizer, text: str) -> list[int]:
        """A rendered conversation's ids, as finetuning encoded them: the built-in format's chats start with EOS,
        as pretraining documents did; a model's own template writes every marker itself."""
        return [tokenizer.eos_id] * self.builtin + tokenizer.encode([text])[0]

    def reply_stops(self, tokenizer, stops: Sequence[int]) -> tuple[frozenset[int], tuple[str, ...]]:
        """(token ids, texts) at which a reply ends: the model's `stops` and the end-of-turn token (<|im_end|>,
        <|eot_id|>); an end-of-turn marker of several tokens (the built-in "<|end|>") is cut as text instead."""
        marker = tokenizer.encode([self.end_of_turn])[0]
        if len(marker) == 1:
            return frozenset((*stops, *marker)), ()
        return frozenset(stops), (self.end_of_turn,)

    def parts(self, messages: Sequence[dict], where: str = "") -> Parts:
        """The rendered conversation as layout parts: every assistant reply and the end-of-turn marker after it
        trained on (the last one as the target), everything else prompt; the last user message is the part
        cut when the prompt is too long. Messages after the last reply are left out."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[: last + 1]
        full, marker = self.render(messages, where=where), self.end_of_turn
        context = self._last_user_message(messages, full)
        parts: Parts = []
        done = 0  # the text before it is in parts
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:turn], add_generation_prompt=True, where=where)
            if not full.startswith(prompt) or len(prompt) < done:
                raise UserError(
                    f"{_at(where)}the chat template renders the conversation before message {turn + 1} differently "
                    "from the whole conversation (it is not prefix-stable), so the replies cannot be found in it: "
                    "use a template that leaves earlier turns unchanged"
                )
            reply = message["content"].strip()  # templates often trim it
            start = full.find(reply, len(prompt))
            tail = full[start + len(reply) :] if start >= 0 else ""
            if start < 0 or not tail.lstrip().startswith(marker):
                raise UserError(
                    f"{_at(where)}the chat template does not write the reply of message {turn + 1} followed by "
                    f"{marker!r}, so its place cannot be found: check the template against the data"
                )
            end = start + len(reply) + len(tail) - len(tail.lstrip()) + len(marker)
            if context is not None and done <= context[0] and context[1] <= len(prompt):
                (c0, c1), p = context, len(prompt)
                parts += [(full[done:c0], PROMPT), (full[c0:c1], CONTEXT), (full[c1:p], PROMPT)]
            else:
                parts.append((full[done : len(prompt)], PROMPT))
            parts.append((full[len(prompt) : end], TARGET if turn == last else TRAINED))
            done = end
        return parts

    def _last_user_message(self, messages: Sequence[dict], full: str) -> tuple[int, int] | None:
        """Where the last user message's text lies in the rendered conversation `full`, when that shows."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        text = messages[users[-1]]["content"].strip() if users else ""
        if not text:
            return None
        try:  # the conversation up to that message: its text is the last thing in it (but the turn's marker)
            upto = self.render(messages[: users[-1] + 1])
        except UserError:
            return None
        at = upto.rfind(text) if full.startswith(upto) else -1
        return (at, at + len(text)) if at >= 0 else None


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def chat_format(tokenizer) -> ChatFormat:
    """The format a tokenizer's model chats in: its chat_template, else bigmodel's own."""
    tokens = tuple((name, value) for name in SPECIAL_TOKENS if (value := getattr(tokenizer, name, None)) is not None)
    return ChatFormat(stored_template(getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE), tokens)
