"""`bigmodel export --format gguf`, read back by an independent reader: transformers' GGUF loader (which
dequantizes the file and undoes llama.cpp's layouts). For a model bigmodel trained (Llama, SentencePiece) and an
`hf:` import (Qwen2 with biases and a byte-level BPE tokenizer.json): greedy tokens, logits, tokenizer ids."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub

import gguf
import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from bigmodel_cli import modelio
from bigmodel_cli.config import MeshConfig
from bigmodel_cli.evaluate.generate import Sampling, generate_ids
from bigmodel_cli.parallel import make_mesh
from tests.conftest import TINY_HF_SHAPE, pretrain_args
from tests.test_hf import ours
from tests.test_hf_tokenizer import byte_level_dir

PROMPT = "the quick brown fox"
TEXTS = [" the cat sat on the mat", " Where is the owl? In the garden.", " 12 + 30 = 42\n  two  spaces"]
NEW_TOKENS = 12
# q8_0 against the f32 model, relative to the logits' standard deviation. Each block of 32 weights is rounded to
# int8 under one f16 scale: an error of up to 1/254 of the block's largest weight, about 30 times f16's rounding
# (11-bit mantissa), and q4_0's 16 levels about 10 times q8_0's again; the readers' logits show exactly those
# ratios (f16 / q8_0 / q4_0 mean errors on the Qwen2 below: 0.03% / 0.7% / 7% of the spread, max 0.1% / 3.7% /
# 36%). Bounds: mean error within 2% and every logit within 10% of the spread: 2.5 times what q8_0 shows, a fifth
# of what q4_0 shows, and far below what a wrong layout does (a transposed or unpermuted tensor, a missing bias
# or norm: errors of the order of the spread itself).
Q8_MEAN_BOUND, Q8_MAX_BOUND = 0.02, 0.10


@pytest.fixture(scope="module")
def models(tmp_path_factory, cli, tiny_data) -> dict[str, dict]:
    """A trained run (llama, SentencePiece) and a transformers-saved Qwen2 (tied, byte-level BPE), each exported
    as f16, q8_0 and q4_0 through the CLI."""
    root = tmp_path_factory.mktemp("gguf")
    run = root / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 20, "train.eval_every": 20, "checkpoint.every": 20}))

    hf_dir = byte_level_dir(root / "qwen2", bos=False)  # Qwen-style: no BOS, ChatML template, <|endoftext|>
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(hf_dir))
    config = Qwen2Config(
        vocab_size=vocab,
        **TINY_HF_SHAPE,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases away from 0, so that their layout matters
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(hf_dir)

    out = {}
    for name, source in (("trained", run), ("qwen2", f"hf:{hf_dir}")):
        files = {q: root / f"{name}-{q}.gguf" for q in ("f16", "q8_0", "q4_0")}
        for quant, path in files.items():
            cli("export", source, "--format", "gguf", "--quant", quant, "--out", path)
        loaded = modelio.load(Path(source), make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
        out[name] = {"loaded": loaded, "files": files, "tokenizer": loaded.tokenizer("test")}
    return out


def _theirs(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # bigmodel's generate_ids below does not stop at EOS either
    return model


@pytest.mark.parametrize("name", ["trained", "qwen2"])
def test_f16_greedy_tokens_equal_bigmodel_generate(models, name):
    m = models[name]
    prompt = m["tokenizer"].encode_prompt(PROMPT)
    theirs = _theirs(m["files"]["f16"])
    with torch.no_grad():
        generated = theirs.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    ours_new = generate_ids(m["loaded"], [prompt], Sampling(max_new_tokens=NEW_TOKENS, temperature=0.0))[0]
    assert ours_new == generated[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", ["trained", "qwen2"])
def test_q8_0_logits_agree_within_the_bound_and_q4_0_loads(models, name):
    m = models[name]
    tokens = np.random.default_rng(1).integers(0, m["loaded"].model_cfg.vocab_size, (2, 24))
    reference = ours(m["loaded"], tokens)
    with torch.no_grad():
        q8 = _theirs(m["files"]["q8_0"])(torch.tensor(tokens)).logits.numpy()
        q4 = _theirs(m["files"]["q4_0"])(torch.tensor(tokens)).logits.numpy()
    error, spread = np.abs(q8 - reference), reference.std()
    assert error.mean() <= Q8_MEAN_BOUND * spread and error.max() <= Q8_MAX_BOUND * spread, (error.max(), spread)
    assert np.isfinite(q4).all() and q4.shape == reference.shape
    # q4_0 is coarser than q8_0 but still the same model: its error is bounded by the logits' spread
    assert np.abs(q8 - reference).mean() < np.abs(q4 - reference).mean() < reference.std()


@pytest.mark.parametrize("name", ["trained", "qwen2"])
def test_gguf_tokenizer_gives_bigmodel_ids(models, name):
    m = models[name]
    path = m["files"]["f16"]
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF SentencePiece reader always prepends a space (it ignores add_space_prefix, which
    # llama.cpp honours and bigmodel's tokenizers set false): TEXTS start with one, where both readers agree.
    for text in TEXTS + ([PROMPT, "<|im_start|>user\nhi<|im_end|>"] if name == "qwen2" else []):
        assert theirs(text).input_ids == m["tokenizer"].encode_prompt(text), repr(text)


def test_metadata_follows_llama_cpp(models):
    trained = gguf.GGUFReader(models["trained"]["files"]["q8_0"])
    qwen2 = gguf.GGUFReader(models["qwen2"]["files"]["f16"])

    def value(reader, key):
        return reader.fields[key].contents()

    assert value(trained, "general.architecture") == "llama"
    assert value(trained, "tokenizer.ggml.model") == "llama"
    assert value(trained, "tokenizer.ggml.add_space_prefix") is False  # bigmodel's SentencePiece adds none
    assert value(trained, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in trained.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert "output.weight" in types  # untied head
    assert value(qwen2, "general.architecture") == "qwen2"
    assert value(qwen2, "tokenizer.ggml.model") == "gpt2"
    assert value(qwen2, "tokenizer.ggml.pre") == "gpt-2"  # ByteLevel's own GPT-2 split
    assert value(qwen2, "tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in value(qwen2, "tokenizer.chat_template")
    names = {t.name for t in qwen2.tensors}
    assert "blk.1.attn_q.bias" in names and "output.weight" not in names  # biases; tied head omitted


def test_bad_input_is_one_line_and_writes_nothing(models, cli, tmp_path):
    run = models["trained"]["loaded"].home
    out = tmp_path / "x.gguf"
    cases = [
        (("--quant", "q8_0"), "--quant applies to --format gguf only"),  # default format bigmodel
        (("--format", "gguf", "--quant", "q5_k"), "--quant must be one of"),
        (("--format", "gguf", "--dtype", "bfloat16"), "--dtype does not apply to --format gguf"),
    ]
    for args, message in cases:
        result = cli("export", run, "--out", out, *args, ok=False)
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()

    # An architecture llama.cpp computes differently: Mistral with a window shorter than the context.
    hf_dir = tmp_path / "mistral"
    cli("export", run, "--format", "hf", "--out", hf_dir)  # a Llama: the same tensors as a Mistral
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)
    (hf_dir / "config.json").write_text(json.dumps(config))
    result = cli("export", f"hf:{hf_dir}", "--format", "gguf", "--out", out, ok=False)
    assert result.exit_code != 0 and "no sliding window" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))  # no temp file left behind


def test_llama3_rope_is_written_as_llama_cpp_frequency_divisors():
    """llama.cpp divides each base frequency by rope_freqs[i]: that must give bigmodel's Llama 3 frequencies."""
    from bigmodel_cli.config import ModelConfig
    from bigmodel_cli.gguf_export import _llama3_rope_divisors
    from bigmodel_cli.model.rope import rope_frequencies

    cfg = ModelConfig(
        vocab_size=64, rope_type="llama3", rope_factor=8.0, rope_original_max_positions=32, rope_theta=1e4
    )
    base = cfg.rope_theta ** (-np.arange(cfg.dims_per_head // 2) * 2 / cfg.dims_per_head)
    divisors = _llama3_rope_divisors(cfg)
    assert divisors.min() == 1.0 and divisors.max() == 8.0  # high frequencies kept, low ones stretched 8 times
    np.testing.assert_allclose(base / divisors, np.asarray(rope_frequencies(cfg)[0]), rtol=1e-6)


def test_pre_tokenizers_are_known_by_their_split_regex():
    from bigmodel_cli.errors import UserError
    from bigmodel_cli.gguf_export import _pre_tokenizer

    qwen2 = (  # as Qwen2's tokenizer.json spells it
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    llama3 = qwen2.replace(r"\p{N}|", r"\p{N}{1,3}|")

    def spec(*steps):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}

    def split(regex):
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    assert _pre_tokenizer(spec(split(qwen2), byte_level), Path("t")) == "qwen2"
    assert _pre_tokenizer(spec(split(llama3), byte_level), Path("t")) == "llama-bpe"
    assert _pre_tokenizer({"pre_tokenizer": {**byte_level, "use_regex": True}}, Path("t")) == "gpt-2"
    for unknown in (spec(split(r"\s+"), byte_level), {"pre_tokenizer": {**byte_level, "add_prefix_space": True}}):
        with pytest.raises(UserError, match="no pre-tokenizer"):
            _pre_tokenizer(unknown, Path("t"))
