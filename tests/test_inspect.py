"""`bigmodel inspect`: the attention probabilities and the logit lens of tiny Hugging Face models, through the real
CLI, checked against transformers' own (eager attention, logits), and the PNG, the HTML page and bad input."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen3Config

from bigmodel_cli import modelio
from bigmodel_cli.evaluate import inspect as inspect_stage
from tests.conftest import TINY_HF_SHAPE, pretrain_args
from tests.test_hf import CHINESE
from tests.test_hf_tokenizer import byte_level_dir

WINDOW = 6  # Mistral's sliding window: shorter than the prompts, so that keys fall out of it
POSITIONS = 48  # the models' window: the over-long prompt below exceeds it
PROMPT = "the red fox sees the owl in the garden"
FAMILIES = {
    "mistral": (MistralConfig, {"sliding_window": WINDOW}),  # grouped-query attention and a sliding window
    "qwen3": (Qwen3Config, {"head_dim": 24}),  # q/k norms, a head dim that is not width / heads
}


def _model_dir(root: Path, name: str, tokenizer_dir: Path) -> Path:
    """A random transformers model of the family, saved with the byte-level tokenizer (which covers Chinese)."""
    config_class, fields = FAMILIES[name]
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = config_class(
        vocab_size=vocab,
        max_position_embeddings=POSITIONS,
        initializer_range=0.2,  # sharper attention and lens than the default 0.02 gives
        tie_word_embeddings=False,
        **TINY_HF_SHAPE,
        **fields,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1, so that a norm applied in the wrong place shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.normal_(1.0, 0.2)
    directory = root / name
    model.save_pretrained(directory)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory / file.name)
    return directory


@pytest.fixture(scope="module")
def inspected(tmp_path_factory, cli):
    """Each family's model dir and `bigmodel inspect` of PROMPT, and the Mistral model inspecting Chinese."""
    root = tmp_path_factory.mktemp("inspect")
    tokenizer_dir = byte_level_dir(root / "tokenizer", bos=True)
    runs = {}
    for name in FAMILIES:
        directory = _model_dir(root, name, tokenizer_dir)
        out = root / f"out-{name}"
        result = cli("inspect", f"hf:{directory}", "--prompt", PROMPT, "--out", out, "--top-k", "4")
        runs[name] = (directory, out, result.stdout)
    directory = runs["mistral"][0]
    cli("inspect", f"hf:{directory}", "--prompt", CHINESE, "--out", root / "out-chinese")
    runs["chinese"] = (directory, root / "out-chinese", "")
    return runs


def _attention(out: Path) -> np.ndarray:
    return np.load(out / "attention.npz")["attention"]


def _transformers(directory: Path, ids: list[int]):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids]), output_attentions=True)


def test_rows_are_distributions_with_causal_and_window_zeros(inspected):
    _, out, stdout = inspected["mistral"]
    attention = _attention(out)
    n_layers, n_heads, t, _ = attention.shape
    assert (n_layers, n_heads) == (TINY_HF_SHAPE["num_hidden_layers"], TINY_HF_SHAPE["num_attention_heads"])
    assert t > WINDOW + 2
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    query, key = np.indices((t, t))
    assert np.all(attention[..., key > query] == 0)  # no token sees a later one
    assert np.all(attention[..., key <= query - WINDOW] == 0)  # nor one that left the sliding window
    assert np.all(attention[..., (key <= query) & (key > query - WINDOW)] > 0)
    for name in ("attention.png", "index.html", "attention.npz", "logit_lens.json"):
        assert str(out / name) in stdout  # printed where each file went


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_and_lens_match_transformers(inspected, family):
    directory, out, _ = inspected[family]
    lens = json.loads((out / "logit_lens.json").read_text(encoding="utf-8"))
    ids = lens["ids"]
    assert ids == AutoTokenizer.from_pretrained(directory)(PROMPT).input_ids  # BOS as transformers adds it
    theirs = _transformers(directory, ids)
    expected = np.stack([a[0].numpy() for a in theirs.attentions])  # [L,H,T,T]
    np.testing.assert_allclose(_attention(out), expected, atol=2e-5)
    # The lens's last layer is the model's own prediction at every position: its top-k, in order
    probs = torch.softmax(theirs.logits[0], dim=-1).numpy()  # [T,V]
    top_k = lens["top_k"]
    assert top_k == 4 and len(lens["layers"]) == TINY_HF_SHAPE["num_hidden_layers"]
    for position, candidates in enumerate(lens["layers"][-1]):
        expected_ids = np.argsort(-probs[position], kind="stable")[:top_k]
        assert [c["id"] for c in candidates] == expected_ids.tolist()
        np.testing.assert_allclose([c["prob"] for c in candidates], probs[position, expected_ids], atol=1e-5)
    # An earlier layer predicts something else: it is read from its own residual stream, not the last one
    assert lens["layers"][0] != lens["layers"][-1]


def test_chinese_prompt_is_tokenized_as_bigmodel_tokenize_shows(inspected, cli):
    directory, out, _ = inspected["chinese"]
    lens = json.loads((out / "logit_lens.json").read_text(encoding="utf-8"))
    shown = json.loads(cli("tokenize", f"hf:{directory}", "--text", CHINESE, "--json").stdout)
    assert lens["ids"] == shown["ids"] and lens["prompt"] == CHINESE
    assert _attention(out).shape[-1] == len(shown["ids"])
    labels = "".join(lens["tokens"])
    assert any(ch in labels for ch in CHINESE if ord(ch) > 0x3000)  # whole characters shown as text
    assert CHINESE in (out / "index.html").read_text(encoding="utf-8")


def test_png_shows_the_maps(inspected):
    for name in ("mistral", "chinese"):
        pixels = np.asarray(Image.open(inspected[name][1] / "attention.png").convert("RGB"))
        assert pixels.shape[0] > 300 and pixels.shape[1] > 300
        assert pixels.std() > 20
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # a colour map, not a blank canvas


def test_html_page_embeds_the_data_and_loads_nothing(inspected):
    out = inspected["qwen3"][1]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "<link" not in html
    embedded = html.split("const DATA = ", 1)[1].split(";\n", 1)[0]
    data = json.loads(embedded)
    np.testing.assert_allclose(np.array(data["attention"]), _attention(out), atol=5e-5)
    assert data["layers"] == json.loads((out / "logit_lens.json").read_text(encoding="utf-8"))["layers"]
    assert '<select id="layer">' in html and '<select id="head">' in html


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "--prompt is empty"),
        ("too long", f"more than the model's {POSITIONS} positions"),
        ("over the cap", "inspect draws at most 8"),
        ("under a file", "is not a writable directory"),
        ("not empty", "already exists and is not empty"),
        ("top-k", "--top-k must be at least 1"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(inspected, cli, tmp_path, monkeypatch, case, message):
    directory = inspected["mistral"][0]
    prompt, out, extra = PROMPT, tmp_path / "out", []
    if case == "empty":
        prompt = ""
    elif case == "too long":
        prompt = "the owl " * POSITIONS
    elif case == "over the cap":  # a prompt that fits the model, but not a readable page
        monkeypatch.setattr(inspect_stage, "MAX_PROMPT_TOKENS", 8)
    elif case == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "not empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    else:
        extra = ["--top-k", "0"]
    before = sorted(tmp_path.rglob("*"))
    result = cli("inspect", f"hf:{directory}", "--prompt", prompt, "--out", out, *extra, ok=False)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no output, no staging directory left behind


def test_a_run_with_a_character_tokenizer(cli, tiny_data, tmp_path):
    """A bigmodel run (character tokenizer, no BOS): the lens's last layer is the model's own forward pass."""
    run = tmp_path / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 2, "checkpoint.every": 2, "train.eval_every": 0}))
    out = tmp_path / "out"
    cli("inspect", run, "--prompt", "the red fox", "--out", out, "--top-k", "3")
    lens = json.loads((out / "logit_lens.json").read_text(encoding="utf-8"))
    assert lens["tokens"] == list("the red fox")  # one token per character, each shown as itself
    loaded = modelio.load(run)
    logits = nnx.merge(loaded.graphdef, loaded.params)(np.asarray([lens["ids"]]))[0]  # [T,V]
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for position, candidates in enumerate(lens["layers"][-1]):
        expected = np.argsort(-probs[position], kind="stable")[:3]
        assert [c["id"] for c in candidates] == expected.tolist()
        np.testing.assert_allclose([c["prob"] for c in candidates], probs[position, expected], atol=1e-5)
    np.testing.assert_allclose(_attention(out).sum(-1), 1.0, atol=1e-5)
