"""Hugging Face tokenizers (tokenizer.json + tokenizer_config.json) as bigmodel reads them, checked against
transformers' AutoTokenizer: ids, BOS/EOS, decoding, and through preprocess, pretrain, export and `tokenize`."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bigmodel_cli import export
from bigmodel_cli.data import preprocess
from bigmodel_cli.data.tokenizer import HFTokenizer, open_tokenizer, sequence_start
from bigmodel_cli.tasks import layout
from bigmodel_cli.tasks.options import TaskOptions
from tests.conftest import TINY_HF_SHAPE, pretrain_args
from tests.test_hf import CORPUS, SAMPLES, _sentencepiece, tiny_loaded

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
# Special-token strings inside text: transformers reads them as the special token (unless split_special_tokens).
TEXTS = SAMPLES + [
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b <|begin_of_text|> c",
    "\n\n\n   \n\t\t  x  \n",
]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def byte_level_dir(directory: Path, bos: bool, **config_changes) -> Path:
    """A Qwen/Llama 3 style byte-level BPE tokenizer saved by transformers; with bos, a post-processor that
    puts <|begin_of_text|> before every text (Llama 3, SmolLM2), else one that adds nothing (Qwen)."""
    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    if bos:
        bos_id = tk.token_to_id("<|begin_of_text|>")
        tk.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>" if bos else None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(directory)
    if config_changes:
        config_file = directory / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_changes}))
    return directory


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byte_level")
    return {
        "bos": byte_level_dir(root / "bos", True),
        "plain": byte_level_dir(root / "plain", False),
        # Config the tokenizer.json lacks: a special token to add, special-token strings read as text.
        "config": byte_level_dir(
            root / "config", True, split_special_tokens=True, additional_special_tokens=["<tool_call>"]
        ),
    }


def assert_same_as_transformers(ours, directory: Path, texts: list[str]) -> None:
    theirs = AutoTokenizer.from_pretrained(directory)
    for text in texts:
        ids = theirs(text).input_ids
        assert ours.encode_prompt(text) == ids, repr(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), repr(text)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == tuple(
        -1 if i is None else i for i in (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    )
    assert ours.vocab_size == len(theirs)


@pytest.mark.parametrize("variant", ["bos", "plain", "config"])
def test_tokenizer_json_gives_transformers_ids(byte_level, variant):
    directory = byte_level[variant]
    ours = open_tokenizer(directory)
    assert isinstance(ours, HFTokenizer)
    assert (ours.add_bos, ours.add_eos) == (variant != "plain", False)
    assert ours.chat_template == CHAT_TEMPLATE  # from chat_template.jinja, which transformers 5 writes
    assert_same_as_transformers(ours, directory, [*TEXTS, "call <tool_call> now"])
    if variant == "config":  # split_special_tokens: the string is text, not the token
        assert ours.tk.token_to_id("<|im_start|>") not in ours.encode(["<|im_start|>"])[0]
    for text in TEXTS[:6]:  # byte-level: every text round-trips
        assert ours.decode(ours.encode([text])[0]) == text


def test_sentencepiece_dir_with_add_bos_token_starts_prompts_with_bos(tmp_path):
    """The issue's bug: a Llama directory with tokenizer.model and {"add_bos_token": true}."""
    _sentencepiece(tmp_path / "tokenizer.model", True, ["\n"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    ours = open_tokenizer(tmp_path)
    assert ours.add_bos and ours.encode_prompt("Hello world")[0] == ours.bos_id == 1
    assert sequence_start(ours) == 1
    # SentencePiece reads special-token strings in text as characters; transformers as the tokens.
    assert_same_as_transformers(ours, tmp_path, SAMPLES)
    (tmp_path / "tokenizer_config.json").unlink()  # transformers 5 adds nothing without the config
    assert not open_tokenizer(tmp_path).add_bos and AutoTokenizer.from_pretrained(tmp_path)("Hi").input_ids[0] != 1


def test_hf_export_of_a_sentencepiece_model_that_adds_bos_tells_transformers_so(tmp_path):
    home = tmp_path / "model"
    home.mkdir()
    _sentencepiece(home / "tokenizer.model", True, ["\n"])
    (home / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": CHAT_TEMPLATE}))
    ours = open_tokenizer(home)
    out = export.export(tiny_loaded(home, vocab_size=ours.vocab_size), tmp_path / "hf", "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["chat_template"]) == (True, CHAT_TEMPLATE)
    theirs = AutoTokenizer.from_pretrained(out)  # reads the restated tokenizer.json, whose post-processor adds BOS
    for text in SAMPLES:
        assert theirs(text).input_ids == ours.encode_prompt(text), repr(text)
    assert open_tokenizer(out).encode_prompt(SAMPLES[0]) == ours.encode_prompt(SAMPLES[0])


def test_generate_from_a_sentencepiece_hf_dir_matches_transformers_greedy(tmp_path, cli):
    _sentencepiece(tmp_path / "tokenizer.model", True, ["\n"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=600,
        **TINY_HF_SHAPE,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    prompt = "The quick brown fox"
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    ids = theirs(prompt, return_tensors="pt").input_ids
    assert ids[0, 0] == 1
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = prompt + theirs.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    got = cli("generate", f"hf:{tmp_path}", "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0")
    assert got.stdout.rstrip("\n") == expected


def test_layouts_start_with_bos_where_the_tokenizer_adds_one(byte_level):
    opts = TaskOptions(max_target_tokens=8)
    parts = [[("Question: 2+2?", layout.PROMPT), ("\nAnswer:", layout.PROMPT), (" 4", layout.TARGET)]]
    for variant, first in (("bos", "<|begin_of_text|>"), ("plain", "<|endoftext|>")):
        tokenizer = open_tokenizer(byte_level[variant])
        encoded = layout.encode(parts, [True], tokenizer, 32, opts)
        assert tokenizer.pieces([int(encoded["inputs"][0, 0])]) == [first]
        (prompts,) = layout.generation_prompts(parts, False, tokenizer, 32, opts)
        assert prompts[0][0] == encoded["inputs"][0, 0]
        if variant == "bos":  # the prompt is exactly what transformers feeds the model
            assert prompts[0] == tokenizer.encode_prompt("Question: 2+2?\nAnswer:")


# ----------------------------------------------------------------------------------------------------------
# preprocess -> pretrain -> export -> tokenize, with a tokenizer.json
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, cli, byte_level) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tokenizer_world")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text}) + "\n" for text in CORPUS[:60]), encoding="utf-8")
    data = root / "data"
    cli("preprocess", docs, "--out", data, "--tokenizer", f"hf:{byte_level['bos']}", "--pack-documents")
    run = root / "run"
    settings = {"train.steps": 2, "train.eval_every": 2, "checkpoint.every": 2, "train.batch_size": 8}
    cli(*pretrain_args(run, data, {**settings, "data.seq_len": 32, "model.max_seq_len": 32}))
    cli("export", run, "--out", root / "export")
    cli("export", run, "--format", "hf", "--out", root / "export-hf")
    return {"data": data, "run": run, "export": root / "export", "export-hf": root / "export-hf", **byte_level}


def test_preprocess_starts_documents_with_bos_and_keeps_the_tokenizer_files(world):
    data = world["data"]
    manifest = json.loads((data / "manifest.json").read_text())
    info = manifest["tokenizer"]
    assert info["file"] == "tokenizer.json" and info["add_bos"] is True
    assert set(info["files"]) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    tokenizer = open_tokenizer(data)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    tokens = np.fromfile(data / "train-00000.bin", dtype=manifest["dtype"])
    assert tokens[0] == bos and tokens[-1] == eos
    after_eos = tokens[1:][tokens[:-1] == eos]
    assert len(after_eos) > 10 and (after_eos == bos).all()  # every document: BOS ... EOS
    starts = np.fromfile(data / "train-00000.idx", dtype=np.int64)
    assert (tokens[starts] == bos).all()  # packed segments start at the BOS
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (world["run"] / name).read_bytes() == (data / name).read_bytes()
        assert (world["export"] / name).is_file()


def test_pretrain_refuses_data_whose_tokenizer_config_was_changed(world, cli, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    config = json.loads((data / "tokenizer_config.json").read_text())
    (data / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": None}))
    result = cli(*pretrain_args(tmp_path / "run", data, {"train.steps": 1}), ok=False)
    assert result.exit_code != 0 and not (tmp_path / "run").exists()
    assert f"{data / 'tokenizer_config.json'} is damaged or was replaced" in result.stderr


def test_every_document_starts_with_bos_whatever_the_worker_count(tmp_path, monkeypatch, byte_level):
    monkeypatch.setattr(preprocess, "BATCH_CHARS", 2000)  # many batches: documents start across batch ends
    texts = CORPUS[:40]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        config = preprocess.PreprocessConfig(
            (tmp_path / "c.jsonl",), out, tokenizer=byte_level["bos"], val_fraction=0, workers=workers
        )
        manifest = preprocess.run(config)
        outs.append((out / "train-00000.bin").read_bytes())
    assert outs[0] == outs[1]
    tokenizer = open_tokenizer(out)
    tokens = np.frombuffer(outs[0], dtype=manifest["dtype"]).tolist()
    documents = []
    while tokens:
        end = tokens.index(tokenizer.eos_id) + 1
        documents.append(tokens[:end])
        tokens = tokens[end:]
    assert documents == [tokenizer.encode_prompt(t) + [tokenizer.eos_id] for t in texts]


def _tokenize(cli, source, text: str) -> list[int]:
    return json.loads(cli("tokenize", source, "--text", text, "--json").stdout)["ids"]


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[-2]])
def test_tokenize_every_source_kind_and_the_hf_export_agree_with_transformers(world, cli, text):
    expected = AutoTokenizer.from_pretrained(world["bos"])(text).input_ids
    sources = [
        world["run"],
        world["run"] / "checkpoints" / "2",
        world["export"],
        f"hf:{world['export-hf']}",
        f"hf:{world['bos']}",
        world["bos"] / "tokenizer.json",
    ]
    for source in sources:
        assert _tokenize(cli, source, text) == expected, source
    exported = AutoTokenizer.from_pretrained(world["export-hf"])
    assert exported(text).input_ids == expected
    config = json.loads((world["export-hf"] / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)  # what bigmodel does
    assert config["chat_template"] == CHAT_TEMPLATE and exported.chat_template == CHAT_TEMPLATE


def test_finetune_from_the_hf_export_keeps_its_tokenizer_and_fits_the_data(world, cli, tmp_path):
    docs = [{"document": f"the {c} fox sees the owl. it is late.", "summary": f"{c} fox"} for c in ("red", "blue")]
    (tmp_path / "sum.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs * 4))
    run = tmp_path / "ft"
    steps = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "train.eval_every=2"]
    cli(
        "finetune",
        "--task",
        "summarize",
        "--init-from",
        f"hf:{world['export-hf']}",
        "--data",
        tmp_path / "sum.jsonl",
        "--run-dir",
        run,
        *steps,
        "--set",
        "task.max_target_tokens=8",
    )
    assert (run / "tokenizer.json").read_bytes() == (world["data"] / "tokenizer.json").read_bytes()
    assert json.loads((run / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert _tokenize(cli, run, TEXTS[0]) == _tokenize(cli, world["run"], TEXTS[0])
    for model in (world["run"], run):  # the data's tokenizer is the model's: evaluation accepts it
        metrics = json.loads(cli("evaluate", model, "--data", world["data"], "--json").stdout.strip().splitlines()[-1])
        assert np.isfinite(metrics["loss"])


def test_tokenize_a_sentencepiece_model_file_prints_ids_and_pieces(tmp_path, cli):
    _sentencepiece(tmp_path / "tok.model", True, ["\n"])
    result = json.loads(cli("tokenize", tmp_path / "tok.model", "--text", "the lazy dog", "--json").stdout)
    ours = open_tokenizer(tmp_path / "tok.model")
    assert result == {"ids": ours.encode(["the lazy dog"])[0], "tokens": ours.pieces(result["ids"])}
    assert "".join(result["tokens"]) == "▁the▁lazy▁dog"
    plain = cli("tokenize", tmp_path / "tok.model", "--text", "the lazy dog").stdout
    assert plain.splitlines()[0] == f"ids:    {json.dumps(result['ids'])}"


def test_bad_tokenizer_files_are_one_line_errors(tmp_path, cli, byte_level):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = cli("tokenize", f"hf:{no_tokenizer}", "--text", "x", ok=False)
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        f"error: {no_tokenizer} has no tokenizer.json or tokenizer.model: the model's tokenizer is missing: "
        "restore its tokenizer files"
    ]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    for source in (f"hf:{corrupt}", corrupt / "tokenizer.json"):
        result = cli("tokenize", source, "--text", "x", ok=False)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {corrupt / 'tokenizer.json'} is not a tokenizer.json"), lines
    out = tmp_path / "data"
    (tmp_path / "a.txt").write_text("some text\n")
    result = cli("preprocess", tmp_path / "a.txt", "--out", out, "--tokenizer", corrupt, ok=False)
    assert result.exit_code != 0 and "is not a tokenizer.json" in result.stderr and not out.exists()
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "tokenizer.json").write_bytes((byte_level["plain"] / "tokenizer.json").read_bytes())
    (bad_config / "tokenizer_config.json").write_text("{not json")
    result = cli("tokenize", bad_config, "--text", "x", ok=False)
    assert result.exit_code != 0 and "tokenizer_config.json is not valid JSON" in result.stderr
