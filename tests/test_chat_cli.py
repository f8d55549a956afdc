"""A tiny instruct run finetuned in a ChatML template, through the CLI: the template recorded and used,
`generate --chat` holding a conversation, and the HF export rendering chats as transformers does."""

import json
import warnings

import pytest

from bigmodel_cli.data.tokenizer import Tokenizer
from bigmodel_cli.tasks import taskinfo
from bigmodel_cli.tasks.chat import ChatFormat, chat_format
from tests.chat_helpers import CHAT, MISTRAL, QWEN, SYSTEM
from tests.conftest import pretrain_args, synthetic_text
from tests.task_helpers import write

transformers = pytest.importorskip("transformers")


def chat_cli(*args, input: str = ""):
    """`bigmodel ARGS...` in-process with `input` on stdin; the click Result."""
    from typer.testing import CliRunner

    from bigmodel_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


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
