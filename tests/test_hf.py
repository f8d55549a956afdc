"""Hugging Face interop: export to and import from transformers Llama directories, checked against it."""

import functools
import io
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bigmodel_cli import export, hf, hf_config, modelio
from bigmodel_cli.config import MeshConfig, ModelConfig
from bigmodel_cli.data.tokenizer import Tokenizer, train
from bigmodel_cli.errors import UserError
from bigmodel_cli.model.layout import param_name
from bigmodel_cli.model.params import LoadedModel, abstract_params
from bigmodel_cli.parallel import make_mesh
from tests.conftest import TINY_HF_SHAPE, model_tolerance


def tiny_loaded(home: Path, vocab_size: int = 96, tie: bool = False, seed: int = 0) -> LoadedModel:
    """A random GQA model on one device, with norms perturbed so that every tensor's layout matters."""
    # init_std 0.3 spreads the logits, so greedy decoding has no near-ties that rounding could flip.
    cfg = ModelConfig(
        vocab_size=vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=96,
        max_seq_len=64,
        tie_embeddings=tie,
        init_std=0.3,
    )
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    graphdef, like = abstract_params(cfg, mesh)
    rng = np.random.default_rng(seed)

    def init(path, spec):  # numpy, not jax ops: no compilation per parameter
        norm = "norm" in param_name(path)
        value = 1.0 + 0.1 * rng.standard_normal(spec.shape) if norm else 0.3 * rng.standard_normal(spec.shape)
        return jax.device_put(value.astype(spec.dtype), spec.sharding)

    params = jax.tree_util.tree_map_with_path(init, like)
    return LoadedModel(cfg, graphdef, params, mesh, home, 0, 64, "")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)


def ours(loaded: LoadedModel, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(loaded.graphdef, loaded.params, jnp.asarray(tokens, jnp.int32)))


def ours_greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence each step (right-padded to one fixed shape)."""
    ids = list(prompt)
    window = np.zeros((1, len(prompt) + n), np.int32)
    for _ in range(n):
        window[0, : len(ids)] = ids
        ids.append(int(np.argmax(ours(loaded, window)[0, len(ids) - 1])))
    return ids[len(prompt) :]


def theirs(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ----------------------------------------------------------------------------------------------------------
# bigmodel -> transformers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie,max_shard_bytes", [(False, None), (True, 40_000)])
def test_export_matches_transformers_logits_and_greedy_generation(tmp_path, tie, max_shard_bytes):
    loaded = tiny_loaded(tmp_path, tie=tie)
    out = export.export(loaded, tmp_path / "hf", "hf", max_shard_bytes=max_shard_bytes)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tie
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    if max_shard_bytes:  # sharded, and transformers follows the index
        index = json.loads((out / hf.WEIGHTS_INDEX).read_text())
        assert len(set(index["weight_map"].values())) > 2 and not (out / hf.WEIGHTS).exists()
    assert ("lm_head.weight" in tensors(out)) is not tie

    model = theirs(out)
    tokens = np.random.default_rng(0).integers(0, loaded.model_cfg.vocab_size, (3, 20))
    with torch.no_grad():
        their_logits = model(torch.tensor(tokens)).logits.numpy()
    # Here: 2.6e-5, against 2.0e-4 (2.4e-4 tied); a norm epsilon of 1e-6 for 1e-5 moves them by 1.1e-3, a
    # RoPE base of 5e5 for 1e4 by 9, a missing layer by 8.
    tolerance = model_tolerance(their_logits, loaded.model_cfg, tokens.shape[1])
    np.testing.assert_allclose(ours(loaded, tokens), their_logits, atol=tolerance, rtol=0)

    prompt = [5, 17, 3, 42, 8]
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=32,
            pad_token_id=0,
        )
    assert generated[0, len(prompt) :].tolist() == ours_greedy(loaded, prompt, 32)


def test_export_bfloat16(tmp_path):
    loaded = tiny_loaded(tmp_path)
    out = export.export(loaded, tmp_path / "hf", "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    expected = torch.tensor(np.asarray(loaded.params["layers"][0]["self_attn"]["q_proj"]).T).bfloat16()
    assert torch.equal(weight, expected)
    again = export.export(modelio.load(Path(f"hf:{out}")), tmp_path / "again", "hf")  # bf16 in, bf16 out
    assert all(np.array_equal(a, tensors(again)[k]) for k, a in tensors(out).items())


def test_export_refuses_a_non_empty_directory_and_bad_options(tmp_path):
    loaded = tiny_loaded(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export.export(loaded, tmp_path / "taken", "hf")
    with pytest.raises(UserError, match="--format"):
        export.export(loaded, tmp_path / "new", "onnx")
    with pytest.raises(UserError, match="--dtype"):
        export.export(loaded, tmp_path / "new", "hf", dtype="float16")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------
# transformers -> bigmodel (hf:DIR) -> transformers
# ----------------------------------------------------------------------------------------------------------


def hf_random_llama(directory: Path, tie: bool = False, max_shard_size: str | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        **TINY_HF_SHAPE,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


@pytest.mark.parametrize("tie,max_shard_size", [(False, None), (True, "30KB")])
def test_import_matches_transformers_and_reexport_is_bit_identical(tmp_path, tie, max_shard_size):
    source = tmp_path / "source"
    model = hf_random_llama(source, tie, max_shard_size)
    assert (source / hf.WEIGHTS_INDEX).exists() == bool(max_shard_size)

    loaded = modelio.load(Path(f"hf:{source}"), make_mesh(MeshConfig()))
    assert loaded.home == source and loaded.seq_len == 256 and loaded.data_path == ""
    tokens = np.random.default_rng(1).integers(0, 128, (2, 24))
    with torch.no_grad():
        their_logits = model(torch.tensor(tokens)).logits.numpy()
    # Here: 6.9e-6, against 1.7e-4.
    tolerance = model_tolerance(their_logits, loaded.model_cfg, tokens.shape[1])
    np.testing.assert_allclose(ours(loaded, tokens), their_logits, atol=tolerance, rtol=0)

    out = export.export(loaded, tmp_path / "again", "hf")
    original, exported = tensors(source), tensors(out)
    assert sorted(original) == sorted(exported)
    for name, array in original.items():
        assert exported[name].dtype == array.dtype and np.array_equal(exported[name], array), name


def _write_config(directory: Path, **changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_scaling": None,
    }
    config.update(changes)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v != "absent"}))
    return directory


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"architectures": ["LlamaForCausalLM", "Extra"]}, "architectures"),
        ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}, "architectures"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        (
            {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": -4},
            "sliding_window",
        ),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "use_sliding_window": True,
                "max_window_layers": 0,  # layers from this one on slide, in a window of 4096 (Qwen2Config's)
            },
            "use_sliding_window",
        ),
        (
            {
                "architectures": ["Qwen3ForCausalLM"],
                "model_type": "qwen3",
                "use_sliding_window": True,
                "sliding_window": 8,
                "max_window_layers": 1,
            },
            "use_sliding_window",
        ),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"hidden_size": "absent"}, "hidden_size"),
        ({"num_key_value_heads": "2"}, "num_key_value_heads"),
    ],
)
def test_import_refuses_unsupported_configs_naming_the_field(tmp_path, changes, field):
    home = _write_config(tmp_path / "m", **changes)
    with pytest.raises(UserError, match=field) as err:
        modelio.load(Path(f"hf:{home}"))
    assert "\n" not in str(err.value) and str(err.value).count("config.json") == 1  # the file named once


def test_import_refuses_a_download_cut_short_in_one_line(tmp_path):
    """A shard the index names but the directory lacks, or a file cut part way (its header intact): what an
    interrupted download leaves. Both are the user's to fix, not internal errors."""
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    hf_random_llama(sharded, max_shard_size="40KB")
    hf_random_llama(single)
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(UserError, match=f"{shards[-1].name} .1 of the shards model.safetensors.index.json names"):
        modelio.load(Path(f"hf:{sharded}"))
    weights = single / hf.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="is damaged or incomplete .* download it again"):
        modelio.load(Path(f"hf:{single}"))


def test_import_refuses_pickles_and_missing_directories(tmp_path):
    home = _write_config(tmp_path / "m")
    (home / "pytorch_model.bin").write_bytes(b"not unpickled, never")
    with pytest.raises(UserError, match="pickle.*safetensors"):
        modelio.load(Path(f"hf:{home}"))
    with pytest.raises(UserError, match="not a directory"):
        modelio.load(Path(f"hf:{tmp_path / 'nope'}"))


def test_import_refuses_unexpected_tensors(tmp_path):
    source = tmp_path / "source"
    hf_random_llama(source)
    weights = load_file(source / hf.WEIGHTS)
    weights["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(weights, source / hf.WEIGHTS)
    with pytest.raises(UserError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        modelio.load(Path(f"hf:{source}"))


def test_import_reads_mistral_sliding_windows(tmp_path):
    home = _write_config(
        tmp_path / "m",
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        sliding_window=None,
        max_position_embeddings=32768,
        rope_theta=1e6,
    )
    cfg, seq_len = hf_config.read_config(home)
    assert (cfg.rope_theta, cfg.kv_heads, seq_len, cfg.max_seq_len) == (1e6, 2, hf_config.MAX_IMPORT_SEQ_LEN, 4096)
    assert (cfg.architecture, cfg.sliding_window) == ("mistral", 0)
    absent = _write_config(tmp_path / "absent", architectures=["MistralForCausalLM"], model_type="mistral")
    assert hf_config.read_config(absent)[0].sliding_window == 4096  # MistralConfig's default


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------

ENGLISH = "The quick brown fox jumps over the lazy dog. Models learn to predict the next token!"
CHINESE = "我们今天去公园散步，天气非常好。机器学习是人工智能的一个分支。"
EMOJI = "I love pizza 🍕 and cats 🐱! Great job 👍🏽 🎉 family 👨‍👩‍👧"
SPACES = "  indented   text\twith tabs\n\n   and    runs of spaces  \n"
CORPUS = [f"{ENGLISH}\n{CHINESE}\n{EMOJI}\n{SPACES}line {i}: {i * 37} apples\n" * 2 for i in range(150)]
SAMPLES = [
    ENGLISH,
    CHINESE,
    EMOJI,
    SPACES,
    "   leading spaces and trailing   ",
    " x",
    "\n\n  after newlines",
    "\t",
    "   ",
    "",
    "mixed 中文 and English 🍕 words",
    "unseen: Ωmega жук ≠ ∑ 🦜",
    "▁literal ▁pieces",
    "fox " * 40,
]


def _sentencepiece(path: Path, dummy_prefix: bool, symbols: list[str]) -> None:
    """A BPE model trained with sentencepiece directly, in conventions bigmodel's own training avoids."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for doc in CORPUS for line in doc.split("\n") if line]),
        model_writer=model,
        model_type="bpe",
        vocab_size=600,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=dummy_prefix,
        byte_fallback=True,
        user_defined_symbols=symbols,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def test_normalising_tokenizer_falls_back_to_llama_tokenizer(tmp_path):
    """SentencePiece's default NFKC rules cannot be restated: transformers converts tokenizer.model itself."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    ours_tok = Tokenizer(tmp_path / "tokenizer.model")
    out = export.export(tiny_loaded(tmp_path, vocab_size=ours_tok.vocab_size), tmp_path / "hf", "hf")
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    their_tok = AutoTokenizer.from_pretrained(out)
    assert their_tok(ENGLISH)["input_ids"] == ours_tok.encode([ENGLISH])[0]  # no BOS; ordinary text agrees


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char", "bpe-dummy-prefix", "bpe-user-symbols"])
def test_exported_tokenizer_gives_our_ids(tmp_path, kind):
    model_file = tmp_path / "tokenizer.model"
    if kind == "bpe-dummy-prefix":  # SentencePiece's default, and Llama 2's: a space before the text
        _sentencepiece(model_file, True, ["\n"])
    elif kind == "bpe-user-symbols":  # multi-character symbols that are always one piece
        _sentencepiece(model_file, False, ["\n", "<|user|>", "<|end|>"])
    else:  # bigmodel's own tokenizer training (BPE and unigram with byte fallback)
        train(CORPUS, model_file, {"bpe": 600, "unigram": 500, "char": 0}[kind], kind)
    ours_tok = Tokenizer(model_file)
    loaded = tiny_loaded(tmp_path, vocab_size=ours_tok.vocab_size)
    out = export.export(loaded, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()

    their_tok = AutoTokenizer.from_pretrained(out)
    assert len(their_tok) == ours_tok.vocab_size
    assert (their_tok.eos_token_id, their_tok.pad_token_id) == (ours_tok.eos_id, ours_tok.pad_id)
    samples = SAMPLES + ["<|user|>hi there<|end|> <|user|><|end|>x"]
    if kind != "unigram":  # the one known difference: unigram reads "<s>" written in text as the control token
        samples.append("<s> and </s> <unk> <0x41> as text")
    for text in samples:
        ids = ours_tok.encode([text])[0]
        assert their_tok(text)["input_ids"] == ids, repr(text)  # no BOS added, same pieces
        if ours_tok.sp.unk_id() not in ids:  # SentencePiece decodes <unk> as " ⁇ ", transformers as "<unk>"
            assert their_tok.decode(ids) == ours_tok.decode(ids), repr(text)
