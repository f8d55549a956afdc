"""Chats in a model's own chat template: our rendering equals transformers' apply_chat_template, the loss falls on
the assistant replies and their end-of-turn markers only, ShareGPT and messages give the same examples, bad
conversations and templates give one line (the CLI run in one: test_chat_cli.py)."""

import dataclasses
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bigmodel_cli import tasks
from bigmodel_cli.data.tokenizer import open_tokenizer
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import masks, taskinfo
from bigmodel_cli.tasks.chat import CHAT_TEMPLATE, ChatFormat, chat_format
from bigmodel_cli.tasks.options import TaskOptions
from tests.chat_helpers import CHAT, MISTRAL, QWEN, SPECIAL, STYLES, SYSTEM
from tests.conftest import synthetic_text
from tests.task_helpers import write

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer (the `tokenizers` library) knowing every style's special tokens."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = synthetic_text(200) + " ".join(m["content"] for m in [SYSTEM, *CHAT])
    tok.train_from_iterator([text], trainer)
    return tok


def hf_tokenizer(bpe, style: str):
    """transformers' tokenizer of a model in the style: the template and its special tokens."""
    template, bos, eos, _ = STYLES[style]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos)
    fast.chat_template = template
    return fast


def bigmodel_tokenizer(fast):
    """bigmodel's tokenizer for a transformers one, read from the files save_pretrained writes."""
    directory = Path(tempfile.mkdtemp())
    fast.save_pretrained(directory)
    return open_tokenizer(directory)


def conversations(style: str) -> list[list[dict]]:
    """Multi-turn chats each style accepts (Mistral's template takes no system message)."""
    with_system = [] if style == "mistral" else [[SYSTEM, *CHAT]]
    return [*with_system, CHAT, CHAT[:2]]


# ---------------------------------------------------------------------------------------------------------
# Rendering = transformers' apply_chat_template
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
def test_rendering_equals_transformers_apply_chat_template(bpe, style):
    fast = hf_tokenizer(bpe, style)
    ours = chat_format(bigmodel_tokenizer(fast))
    for chat in conversations(style):
        for prompt in (chat, chat[:-1]):  # ending with a reply, and with a user message to answer
            for add_generation_prompt in (False, True):
                expected = fast.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
                text = ours.render(prompt, add_generation_prompt=add_generation_prompt)
                assert text == expected, (style, len(prompt), add_generation_prompt)
                # transformers' tokenize=True adds no BOS again: the template wrote it
                ids = fast.apply_chat_template(
                    prompt, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
                )
                assert bigmodel_tokenizer(fast).encode([text])[0] == list(ids)
    assert ours.end_of_turn == STYLES[style][3]


def test_template_helpers_behave_as_in_transformers(bpe):
    """tojson, strftime_now, namespace, loop controls and the special-token variables."""
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{{ m.content | tojson(indent=2) }}{% endfor %}"
        "{{ ns.n }} {{ strftime_now('%Y') }} {{ bos_token }}{{ eos_token }}{{ pad_token is defined }}"
    )
    fast = hf_tokenizer(bpe, "llama3")
    fast.chat_template = template
    messages = [SYSTEM, {"role": "user", "content": 'Say "<b>héllo</b>"'}]
    assert chat_format(bigmodel_tokenizer(fast)).render(messages) == fast.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------------------------------------------------
# The loss mask: assistant replies and their end-of-turn markers, nothing else
# ---------------------------------------------------------------------------------------------------------


def trained_runs(ids: list[int], trained: list[bool], fast) -> list[str]:
    """The text of each run of trained tokens, special tokens spelled out."""
    runs, current = [], []
    for token, flag in zip(ids, trained, strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [fast.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_loss_falls_on_every_assistant_reply_and_its_end_marker_only(bpe, style, tmp_path):
    fast = hf_tokenizer(bpe, style)
    chat = conversations(style)[0]
    path = write(tmp_path / "chat.jsonl", json.dumps({"messages": chat}) + "\n")
    examples, _ = tasks.get("instruct").load(path, TaskOptions())
    enc = tasks.get("instruct").encode(examples, bigmodel_tokenizer(fast), 512, TaskOptions())
    ids = [int(enc["inputs"][0, 0]), *map(int, enc["targets"][0])]
    trained = [False, *(float(w) > 0 for w in enc["weights"][0])]  # the first token is never predicted

    # Token by token: trained exactly from where the generation prompt ends to the end of the reply's marker.
    marker = STYLES[style][3]
    rendered = fast.apply_chat_template(chat, tokenize=False)
    spans = []
    for turn, message in enumerate(chat):
        if message["role"] == "assistant":
            start = len(fast.apply_chat_template(chat[:turn], tokenize=False, add_generation_prompt=True))
            end = rendered.index(marker, rendered.index(message["content"], start)) + len(marker)
            spans.append((start, end))
    # The sequence is transformers' tokenization of the chat (nothing added) up to the end of the last reply
    # (Qwen's template writes a newline after it, never trained on), then padding.
    encoded = fast(rendered[: spans[-1][1]], add_special_tokens=False, return_offsets_mapping=True)
    expected = list(fast.apply_chat_template(chat, tokenize=True, return_dict=False))[: len(encoded["input_ids"])]
    assert encoded["input_ids"] == expected and ids[: len(expected)] == expected
    should = [any(s <= a and b <= e for s, e in spans) for a, b in encoded["offset_mapping"]]
    assert trained == should + [False] * (len(ids) - len(expected))
    space = " " if style == "mistral" else ""  # Mistral's template puts a space before each reply
    replies = [m["content"] for m in chat if m["role"] == "assistant"]
    assert trained_runs(ids, trained, fast) == [f"{space}{r}{marker}" for r in replies]
    assert "Answer in one" not in "".join(trained_runs(ids, trained, fast))


def test_show_examples_marks_the_replies_of_a_templated_chat(bpe, tmp_path):
    fast = hf_tokenizer(bpe, "qwen")
    fast.eos_token = "<|endoftext|>"  # a base model's EOS: the end-of-turn marker is another token
    path = write(tmp_path / "chat.json", json.dumps([{"messages": CHAT}]))
    examples, _ = tasks.get("instruct").load(path, TaskOptions())
    tokens = bigmodel_tokenizer(fast)
    shown = masks.show_examples(tasks.get("instruct").encode(examples, tokens, 256, TaskOptions()), tokens, 1)
    body = shown.split("\n", 1)[1]
    assert body.startswith("<|im_start|>system\nYou are Qwen")
    assert "<|im_start|>assistant\n⟦The capital of France is Paris.<|im_end|>⟧\n<|im_start|>user\n" in body
    assert body.endswith("<|im_start|>assistant\n⟦About two million people live in Paris.<|im_end|>⟧")


def test_a_reasoning_template_that_changes_earlier_replies_still_finds_them(bpe):
    """Qwen3's style: the last reply gets an empty think block, earlier ones do not."""
    template = QWEN.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        "{%- if message.role == 'assistant' and loop.last %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'"
        " + message.content + '<|im_end|>\\n' }}{%- else %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}",
    )
    fast = hf_tokenizer(bpe, "qwen")
    fast.chat_template = template
    parts = ChatFormat(template).parts(CHAT)
    assert [text for text, role in parts if role in ("trained", "target")] == [
        "The capital of France is Paris.<|im_end|>",
        "<think>\n\n</think>\n\nAbout two million people live in Paris.<|im_end|>",
    ]
    assert "".join(text for text, _ in parts) == fast.apply_chat_template(CHAT, tokenize=False).rstrip("\n")


def test_a_chat_stops_at_the_end_of_turn_token_and_drops_its_oldest_turns_to_fit(bpe, monkeypatch, tmp_path):
    from bigmodel_cli.evaluate import generate

    fast = hf_tokenizer(bpe, "qwen")
    fast.eos_token = "<|endoftext|>"  # so that <|im_end|>, one token, is not EOS
    tokens = bigmodel_tokenizer(fast)
    replies = iter(CHAT[1::2] + [{"content": "Yes."}])
    prompts = []

    def scripted(loaded, ids, sampling, eos_id, pad_to=0):  # a model that says the next reply, then goes on
        prompts.append(ids[0])
        assert len(ids[0]) <= pad_to <= loaded.model_cfg.max_seq_len - sampling.max_new_tokens
        return [tokens.encode([next(replies)["content"] + "<|im_end|>\n<|im_start|>user\nmore"])[0]]

    monkeypatch.setattr(generate, "generate_ids", scripted)
    fmt, question = chat_format(tokens), {"role": "user", "content": "Is it big?"}
    kept = [SYSTEM, CHAT[2], CHAT[3], question]  # the first exchange left out, the system message kept
    expected = [[SYSTEM, CHAT[0]], [SYSTEM, *CHAT[:3]], kept]
    lengths = [len(ids) for ids in tokens.encode([fmt.render(m, add_generation_prompt=True) for m in expected])]
    room = max(lengths)
    assert len(tokens.encode([fmt.render([SYSTEM, *CHAT, question], add_generation_prompt=True)])[0]) > room
    loaded = SimpleNamespace(model_cfg=SimpleNamespace(max_seq_len=room + 8), home=tmp_path)  # no generation_config
    chat = generate.Chat(loaded, tokens, generate.Sampling(max_new_tokens=8))
    chat.messages.append(SYSTEM)
    assert [chat.reply(m["content"]) for m in (CHAT[0], CHAT[2], question)] == [
        "The capital of France is Paris.",
        "About two million people live in Paris.",
        "Yes.",
    ]
    assert chat.messages == [SYSTEM, *CHAT, question, {"role": "assistant", "content": "Yes."}]
    assert prompts == [tokens.encode([fmt.render(m, add_generation_prompt=True)])[0] for m in expected]


# ---------------------------------------------------------------------------------------------------------
# Data formats, and one-line refusals
# ---------------------------------------------------------------------------------------------------------


def test_sharegpt_conversations_give_the_same_examples_as_messages(tmp_path, bpe):
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    conversation = [{"from": sharegpt_roles[m["role"]], "value": m["content"]} for m in [SYSTEM, *CHAT]]
    records = [{"id": "a", "messages": [SYSTEM, *CHAT]}, {"id": "b", "messages": CHAT[:2]}]
    sharegpt = [{"id": "a", "conversations": conversation}, {"id": "b", "conversations": conversation[1:3]}]
    files = {
        "messages.jsonl": "".join(json.dumps(r) + "\n" for r in records),
        "sharegpt.jsonl": "".join(json.dumps(r) + "\n" for r in sharegpt),
        "sharegpt.json": json.dumps(sharegpt),
    }
    kind, tokens = tasks.get("instruct"), bigmodel_tokenizer(hf_tokenizer(bpe, "qwen"))
    loaded = {name: kind.load(write(tmp_path / name, text), TaskOptions())[0] for name, text in files.items()}
    reference = loaded["messages.jsonl"]
    assert [e.meta["messages"] for e in reference] == [[SYSTEM, *CHAT], CHAT[:2]]
    for name, examples in loaded.items():
        assert examples == reference and [e.meta for e in examples] == [e.meta for e in reference], name
        encoded = kind.encode(examples, tokens, 256, TaskOptions())
        assert all(np.array_equal(encoded[k], v) for k, v in kind.encode(reference, tokens, 256, TaskOptions()).items())


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, "each ShareGPT turn needs a 'from' of system, human"),
        ({"conversations": [{"from": "gpt", "value": 3}]}, "each message needs a role .* and a text content"),
        ({"conversations": "hi"}, "'conversations' must be a list of {from, value} objects"),
    ],
)
def test_bad_sharegpt_records_are_refused_in_one_line(tmp_path, record, message):
    path = write(tmp_path / "bad.jsonl", json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message) as err:
        tasks.get("instruct").load(path, TaskOptions())
    assert "\n" not in str(err.value) and "bad.jsonl:1" in str(err.value)


def test_a_template_that_refuses_the_roles_or_is_not_prefix_stable_gives_one_line(bpe, tmp_path):
    kind = tasks.get("instruct")
    path = write(tmp_path / "chat.jsonl", json.dumps({"id": "c7", "messages": [SYSTEM, *CHAT]}) + "\n")
    examples, _ = kind.load(path, TaskOptions())
    with pytest.raises(
        UserError, match="example c7: the chat template refused the conversation: Conversation roles must alternate"
    ):
        kind.encode(examples, bigmodel_tokenizer(hf_tokenizer(bpe, "mistral")), 256, TaskOptions(), source=str(path))
    # Mistral v0.3's way with a system message: into the last user turn, which moves as the chat grows.
    moving = MISTRAL.replace(
        "{{- '[INST] ' + message['content'] + ' [/INST]' }}",
        "{{- '[INST] ' + (system + '\\n\\n' if loop.last else '') + message['content'] + ' [/INST]' }}",
    ).replace("{{- bos_token }}", "{{- bos_token }}{%- set system = 'Be brief.' %}")
    fast = hf_tokenizer(bpe, "mistral")
    fast.chat_template = moving
    with pytest.raises(UserError, match=r"example c8: .*not prefix-stable.*: use a template") as err:
        kind.encode(
            [dataclasses.replace(e, id="c8", meta={"messages": CHAT}) for e in examples],
            bigmodel_tokenizer(fast),
            256,
            TaskOptions(),
        )
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"not valid Jinja \(line 1: .*\): fix the model's chat_template"):
        ChatFormat("{% for m in messages %}").render(CHAT)
    with pytest.raises(UserError, match="writes nothing after an assistant reply"):
        _ = ChatFormat("{% for m in messages %}{{ m.content }}{% endfor %}").end_of_turn


def test_a_run_recorded_with_the_old_builtin_template_reads_as_the_builtin(tmp_path):
    old = (
        "{% for message in messages %}{% if not loop.first %}\n{% endif %}"
        "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}{% if messages %}\n{% endif %}<|assistant|>\n{% endif %}"
    )
    (tmp_path / "task.json").write_text(json.dumps({"task": "instruct", "options": {}, "chat_template": old}))
    assert taskinfo.read(tmp_path).chat_template == CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------------
# The HF export's end-of-turn tokens
# ---------------------------------------------------------------------------------------------------------


def test_an_export_stops_generation_at_the_templates_end_of_turn_token_too(bpe, tmp_path):
    """A base model (EOS <|endoftext|>) finetuned in ChatML: transformers' generate on the export must also stop at
    <|im_end|>, as bigmodel does, so generation_config lists both; a template closing turns with EOS adds none."""
    from bigmodel_cli.hf import generation_eos

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer = bigmodel_tokenizer(fast)
    im_end = fast.convert_tokens_to_ids("<|im_end|>")
    assert generation_eos(tokenizer, QWEN) == [fast.eos_token_id, im_end] and im_end != fast.eos_token_id
    assert generation_eos(bigmodel_tokenizer(hf_tokenizer(bpe, "qwen")), QWEN) == im_end  # EOS is <|im_end|>
