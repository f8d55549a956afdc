"""Chats in a model's own chat template: our rendering equals transformers' apply_chat_template, the loss falls on
the assistant replies and their end-of-turn markers only, ShareGPT and messages give the same examples, bad
conversations and templates give one line, and `generate --chat` holds a conversation through the CLI."""

import dataclasses
import json
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bigmodel_cli import tasks
from bigmodel_cli.data.tokenizer import Tokenizer, open_tokenizer
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import masks, taskinfo
from bigmodel_cli.tasks.chat import CHAT_TEMPLATE, ChatFormat, chat_format
from bigmodel_cli.tasks.options import TaskOptions
from tests.conftest import pretrain_args, synthetic_text
from tests.task_helpers import write

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# ---------------------------------------------------------------------------------------------------------
# Templates in the styles of the models people finetune (written for these tests)
# ---------------------------------------------------------------------------------------------------------

# ChatML as Qwen2.5 writes it: a default system message when the chat has none.
QWEN = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3: BOS written by the template, header ids around each role, a dated system header, replies trimmed.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral: [INST] turns that must alternate, refused otherwise; a reply ends with EOS; no generation prompt.
MISTRAL = """{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# SmolLM2: ChatML with its own default system message, written with plain block tags on their own lines (so
# trim_blocks and lstrip_blocks decide the whitespace) and transformers' {% generation %} around replies.
SMOLLM2 = """{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}
    {% endif %}
{{ '<|im_start|>' + message['role'] + '\\n' }}
    {% if message['role'] == 'assistant' %}
        {% generation %}
{{ message['content'] + '<|im_end|>' }}
        {% endgeneration %}
    {% else %}
{{ message['content'] + '<|im_end|>' }}
    {% endif %}
{{ '\\n' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{% endif %}
"""

# (template, bos_token, eos_token, what ends a reply) as the models' tokenizer configs set them.
STYLES = {
    "qwen": (QWEN, None, "<|im_end|>", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>", "</s>"),
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", "<|im_end|>"),
}
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
]

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And how many people live there?"},
    {"role": "assistant", "content": "About two million people live in Paris."},
]


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


def chat_cli(*args, input: str = ""):
    """`bigmodel ARGS...` in-process with `input` on stdin; the click Result."""
    from typer.testing import CliRunner

    from bigmodel_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


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


def test_a_chat_stops_at_the_end_of_turn_token_and_drops_its_oldest_turns_to_fit(bpe, monkeypatch):
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
    loaded = SimpleNamespace(model_cfg=SimpleNamespace(max_seq_len=room + 8))
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
# A tiny instruct run finetuned in a ChatML template: generate --chat, export, show-examples, bad data
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chatml_run(cli, tmp_path_factory):
    """A tiny character-level model finetuned for 4 steps on ChatML chats rendered with QWEN's template."""
    root = tmp_path_factory.mktemp("chat_run")
    corpus = synthetic_text(400) + "<|im_start|>system user assistant<|im_end|>\nYou are Qwen, created.\n" * 20
    write(root / "corpus.txt", corpus)
    cli("preprocess", root / "corpus.txt", "--out", root / "data", "--model-type", "char")
    settings = {"train.steps": 2, "model.max_seq_len": 256, "checkpoint.every": 2}
    cli(*pretrain_args(root / "base", root / "data", settings))
    chats = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]} for w in "ab"]
    write(root / "chats.jsonl", "".join(json.dumps(c) + "\n" for c in chats * 4))
    # The base model's tokenizer carries the template, where transformers keeps it.
    config = root / "base" / "tokenizer_config.json"
    write(config, json.dumps({"chat_template": QWEN}))
    data = ("--data", root / "chats.jsonl", "--set", "task.max_target_tokens=16")
    common = ("--task", "instruct", "--init-from", root / "base", *data)
    shown = cli("finetune", *common, "--show-examples", "1").stdout
    bad = write(root / "bad.jsonl", (json.dumps({"messages": [CHAT[1], CHAT[0]]}) + "\n") * 2)
    write(config, json.dumps({"chat_template": MISTRAL}))  # a reply before any question: refused
    refused = cli("finetune", *common[:4], "--data", bad, "--show-examples", "1", ok=False)
    write(config, json.dumps({"chat_template": QWEN}))
    settings = ("train.steps=4", "train.batch_size=8", "train.eval_every=4")
    cli("finetune", *common, "--run-dir", root / "run", *[a for s in settings for a in ("--set", s)])
    return {"root": root, "run": root / "run", "shown": shown, "refused": refused}


@pytest.mark.slow
def test_finetuning_uses_and_records_the_model_template(chatml_run):
    assert "<|im_start|>assistant\n⟦a<|im_end|>⟧" in chatml_run["shown"]
    assert chatml_run["shown"].split("\n", 1)[1].count("⟦") == 1  # the system and user turns are not trained
    refused = chatml_run["refused"]
    assert refused.exit_code == 2 and "Conversation roles must alternate" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    info = taskinfo.read(chatml_run["run"])
    assert info.task == "instruct" and info.chat_template == QWEN


@pytest.mark.slow
def test_generate_chat_keeps_the_conversation_and_stops_at_the_end_of_turn(cli, chatml_run, monkeypatch):
    from bigmodel_cli.evaluate import generate

    prompts = []
    real = generate.generate_ids

    def recording(loaded, ids, *args, **kwargs):
        prompts.append(ids[0])
        return real(loaded, ids, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_ids", recording)
    run, fmt = chatml_run["run"], ChatFormat(QWEN)
    tokenizer = Tokenizer(run / "tokenizer.model")
    greedy = ("--temperature", "0", "--max-new-tokens", "12")
    first = chat_cli("generate", run, "--chat", "--prompt", "say a", *greedy, input="never read\n")
    assert len(prompts) == 1 and first.exit_code == 0  # --prompt with --chat: that one message
    reply = first.stdout.removesuffix("\n")
    prompts.clear()
    out = chat_cli("generate", run, "--chat", *greedy, input="say a\nsay b\n\nnot read\n")
    assert out.stdout.startswith(first.stdout) and len(prompts) == 2  # the empty line ended the conversation
    history = [{"role": "user", "content": "say a"}, {"role": "assistant", "content": reply}]
    history.append({"role": "user", "content": "say b"})
    assert prompts == [tokenizer.encode([fmt.render(h, add_generation_prompt=True)])[0] for h in (history[:1], history)]
    prompts.clear()
    answered = cli("generate", run, "--prompt", "say b", *greedy)  # an instruct run answers as a chat turn
    assert prompts == [tokenizer.encode([fmt.render([{"role": "user", "content": "say b"}], True)])[0]]
    assert not answered.stdout.startswith("say b")
    prompts.clear()
    assert chat_cli("generate", run, "--chat", *greedy, input="/exit\nsay a\n").stdout == "" and prompts == []
    # A reply ends where the template ends the assistant's turn.
    said = tokenizer.encode(["Sure.<|im_end|>\n<|im_start|>user\nmore"])[0]
    monkeypatch.setattr(generate, "generate_ids", lambda *args, **kwargs: [said])
    assert chat_cli("generate", run, "--chat", input="hi\n").stdout == "Sure.\n"
    refused = cli("generate", run, "--chat", "--raw", ok=False)
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        "error: --raw continues plain text and --chat holds a conversation: pass one of them"
    ]


@pytest.mark.slow
def test_the_hf_export_carries_the_template_transformers_renders_as_we_do(cli, chatml_run):
    out = chatml_run["root"] / "hf"
    cli("export", chatml_run["run"], "--out", out, "--format", "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == QWEN
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = chat_format(Tokenizer(chatml_run["run"] / "tokenizer.model"))
    ours = ChatFormat(QWEN, ours.special_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for messages, generation in (([SYSTEM, *CHAT], False), (CHAT[:3], True)):
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) == (
                ours.render(messages, generation)
            )


def test_an_export_stops_generation_at_the_templates_end_of_turn_token_too(bpe, tmp_path):
    """A base model (EOS <|endoftext|>) finetuned in ChatML: transformers' generate on the export must also stop at
    <|im_end|>, as bigmodel does, so generation_config lists both; a template closing turns with EOS adds none."""
    from bigmodel_cli.hf import generation_eos

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer = bigmodel_tokenizer(fast)
    im_end = fast.convert_tokens_to_ids("<|im_end|>")
    assert generation_eos(tokenizer, QWEN) == [fast.eos_token_id, im_end] and im_end != fast.eos_token_id
    assert generation_eos(bigmodel_tokenizer(hf_tokenizer(bpe, "qwen")), QWEN) == im_end  # EOS is <|im_end|>
