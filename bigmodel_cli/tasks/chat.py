"""The chat format of instruct models: messages as plain text, the same in Python and as a Jinja template."""

from __future__ import annotations

from collections.abc import Sequence

END_OF_TURN = "<|end|>"  # ends every chat message; generation of a reply can stop when it appears
ROLES = ("system", "user", "assistant")

# The chat format as a Jinja template (Hugging Face's `chat_template`), stored with the model; render_chat is
# the same format in Python. Messages are "<|role|>\n{content}<|end|>", joined by newlines; the generation
# prompt opens an assistant message. Plain text, so any tokenizer can encode it without special tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}\n{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}\n{% endif %}<|assistant|>\n{% endif %}"
)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Messages [{"role", "content"}] as CHAT_TEMPLATE text; optionally opening the assistant's reply."""
    text = "\n".join(f"<|{m['role']}|>\n{m['content']}{END_OF_TURN}" for m in messages)
    if add_generation_prompt:
        text += ("\n" if messages else "") + "<|assistant|>\n"
    return text
