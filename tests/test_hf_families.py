"""The Hugging Face families beyond plain Llama (Llama 3 / linear / YaRN RoPE, Mistral's sliding window, Qwen2's
biases, Qwen3's q/k norms): import matches transformers, decoding matches its generate, and a finetuned model
exports back as the same architecture."""

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from bigmodel_cli import config, export, hf_config, modelio
from bigmodel_cli.config import MeshConfig, ModelConfig
from bigmodel_cli.data.tokenizer import Tokenizer, train
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate.generate import Sampling, generate_ids, stop_ids
from bigmodel_cli.model.sizing import count_params
from bigmodel_cli.model.transformer import Transformer, causal_attention
from bigmodel_cli.parallel import make_mesh
from tests.conftest import TINY_HF_SHAPE, f32_tolerance, model_tolerance

WINDOW = 16  # Mistral's sliding window here: prompts are longer
PROMPT_LEN = 40
SIZES = dict(
    **TINY_HF_SHAPE,
    max_position_embeddings=128,
    initializer_range=0.2,  # spread logits: greedy decoding without near-ties that rounding could flip
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# name -> (config class, its fields beyond SIZES, tied embeddings, how to save: f32, bf16 or sharded)
FAMILIES = {
    "llama3": (
        LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
        False,
        "f32",
    ),
    "llama-linear": (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, True, "bf16"),
    "llama-yarn": (
        LlamaConfig,
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
        False,
        "f32",
    ),
    "mistral": (
        MistralConfig,
        {"sliding_window": WINDOW, "rope_parameters": {"rope_type": "default"}},
        False,
        "sharded",
    ),
    "qwen2": (Qwen2Config, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, True, "f32"),
    "qwen3": (Qwen3Config, {"head_dim": 24, "rope_parameters": {"rope_type": "default"}}, False, "f32"),
}
EXPECTED = {  # what the import must make of each
    "llama3": dict(architecture="llama", rope_type="llama3", rope_factor=8.0, rope_original_max_positions=32),
    "llama-linear": dict(architecture="llama", rope_type="linear", rope_factor=2.0, param_dtype="bfloat16"),
    "llama-yarn": dict(architecture="llama", rope_type="yarn", rope_factor=4.0, rope_beta_fast=32.0),
    "mistral": dict(architecture="mistral", sliding_window=WINDOW),
    "qwen2": dict(architecture="qwen2", qkv_bias=True, rope_theta=1e6, tie_embeddings=True),
    "qwen3": dict(architecture="qwen3", qk_norm=True, head_dim=24),
}
# transformers' config fields that turn each family's feature off
PLAIN_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
WITHOUT_FEATURE = {
    "mistral": {"sliding_window": None},
    **dict.fromkeys(("llama3", "llama-linear", "llama-yarn"), PLAIN_ROPE),
}
QA_TEXT = [
    f"the {c} fox sees the owl in the garden. where is the owl? garden. Context: Question: Answer:"
    for c in ("red", "blue", "green", "brown", "black", "white")
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small SentencePiece BPE model, as an HF directory may ship it (tokenizer.model)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train([line * 3 for line in QA_TEXT] * 20, path, 300, "bpe")


@functools.cache
def _family_dir(name: str, root: Path, tokenizer_file: Path) -> tuple[Path, torch.nn.Module]:
    """A random transformers model of the family saved under root/name (in f32, bf16 or shards), with a tokenizer."""
    config_class, fields, tie, save = FAMILIES[name]
    torch.manual_seed(0)
    vocab = Tokenizer(tokenizer_file).vocab_size
    config = config_class(vocab_size=vocab, tie_word_embeddings=tie, **SIZES, **fields)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so that their layout matters
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.normal_(1.0, 0.1)
            elif param_name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    directory = root / name
    if save == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(directory, **({"max_shard_size": "40KB"} if save == "sharded" else {}))
    (directory / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()  # as saved, in f32
    model.generation_config.eos_token_id = None
    return directory, model


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer_file):
    root = tmp_path_factory.mktemp("families")
    return lambda name: _family_dir(name, root, tokenizer_file)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)


def _ours(loaded, tokens: np.ndarray, **changes) -> np.ndarray:
    graphdef = loaded.graphdef
    if changes:
        model_cfg = dataclasses.replace(loaded.model_cfg, **changes)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: _rebuild(model_cfg)))
    return np.asarray(_forward(graphdef, loaded.params, jnp.asarray(tokens, jnp.int32)))


def _rebuild(model_cfg: ModelConfig) -> Transformer:
    return Transformer(model_cfg, rngs=nnx.Rngs(0))


def _load(directory: Path):
    return modelio.load(Path(f"hf:{directory}"), make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_matches_transformers_logits_and_greedy_decoding(family, tmp_path, name):
    directory, model = family(name)
    loaded = _load(directory)
    for key, value in EXPECTED[name].items():
        assert getattr(loaded.model_cfg, key) == value, key
    tokens = np.random.default_rng(1).integers(0, loaded.model_cfg.vocab_size, (2, PROMPT_LEN))
    with torch.no_grad():
        their_logits = model(torch.tensor(tokens)).logits.numpy()
    tolerance = model_tolerance(their_logits, loaded.model_cfg, PROMPT_LEN)
    for attention in ("chunked", "xla"):
        ours = _ours(loaded, tokens, attention=attention)
        np.testing.assert_allclose(ours, their_logits, atol=min(tolerance, 1e-4), rtol=0, err_msg=attention)
    if name in WITHOUT_FEATURE:  # the feature under test matters here: without it transformers is far off
        without = AutoConfig.from_pretrained(directory)
        for key, value in WITHOUT_FEATURE[name].items():
            setattr(without, key, value)
        plain = AutoModelForCausalLM.from_pretrained(directory, config=without, dtype=torch.float32).eval()
        with torch.no_grad():
            assert np.abs(plain(torch.tensor(tokens)).logits.numpy() - their_logits).max() > 100 * tolerance

    prompt = tokens[0].tolist()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=0,
        )
    ours_new = generate_ids(loaded, [prompt], Sampling(max_new_tokens=10, temperature=0.0))[0]
    assert ours_new == generated[0, PROMPT_LEN:].tolist()

    # Re-exported, it is the same model to transformers: its class, its RoPE, window and biases, the same bits.
    out = export.export(loaded, tmp_path / "again", "hf")
    assert sorted(_tensors(out)) == sorted(_tensors(directory))
    assert all(np.array_equal(a, _tensors(directory)[k]) and a.dtype == _tensors(directory)[k].dtype
               for k, a in _tensors(out).items())  # fmt: skip
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(model)
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor(tokens)).logits.numpy(), their_logits)


def test_generation_stops_at_every_stop_token_of_generation_config_as_transformers_does(family, tmp_path):
    """Llama 3 Instruct's generation_config.json lists <|end_of_text|> and <|eot_id|>: transformers' generate stops
    at either, and so do bigmodel's generation and task evaluation; an export keeps the list."""
    directory, model = family("llama3")
    copy = tmp_path / "instruct"
    shutil.copytree(directory, copy)
    prompt = list(range(3, 3 + PROMPT_LEN))
    free = generate_ids(_load(copy), [prompt], Sampling(max_new_tokens=8, temperature=0.0))[0]
    eot = free[2]  # the token greedy decoding gives third: the model's end of turn, here
    tokenizer = Tokenizer(copy / "tokenizer.model")
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_id, eot]}))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).eval().generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long), do_sample=False,
            max_new_tokens=8, pad_token_id=0,
        )[0, PROMPT_LEN:].tolist()  # fmt: skip
    loaded = _load(copy)
    stops = stop_ids(loaded, tokenizer)
    assert stops == (tokenizer.eos_id, eot) and theirs == free[:3]
    assert generate_ids(loaded, [prompt], Sampling(max_new_tokens=8, temperature=0.0), stops)[0] == theirs
    out = export.export(loaded, tmp_path / "again", "hf")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_id, eot]


# ----------------------------------------------------------------------------------------------------------
# finetune hf:DIR -> export --format hf -> transformers
# ----------------------------------------------------------------------------------------------------------


def _squad(path: Path) -> Path:
    contexts = {
        c: f"the {c} fox sees the owl in the garden." for c in ("red", "blue", "green", "brown", "black", "grey")
    }
    paragraphs = [
        {
            "context": text,
            "qas": [
                {
                    "id": c,
                    "question": "where is the owl?",
                    "answers": [{"text": "garden", "answer_start": text.index("garden")}],
                }
            ],
        }
        for c, text in contexts.items()
    ]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    return {k: v for file in sorted(directory.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.mark.slow
@pytest.mark.parametrize("name,lora", [("qwen2", True), ("qwen3", False), ("mistral", False)])
def test_finetuned_model_exports_as_its_own_architecture(cli, family, tmp_path, name, lora):
    source, _ = family(name)
    run, out = tmp_path / "run", tmp_path / "hf"
    settings = ["train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-2", "data.seq_len=64", "task.max_target_tokens=8"]
    settings += ["lora.rank=4", "lora.targets=all"] if lora else []
    cli(
        "finetune", "--task", "qa", "--init-from", f"hf:{source}", "--data", _squad(tmp_path / "qa.json"),
        "--run-dir", run, *[arg for setting in settings for arg in ("--set", setting)],
    )  # fmt: skip
    cli("export", run, "--out", out, "--format", "hf")
    cli("export", run, "--out", tmp_path / "native")  # bigmodel's own format keeps every family field
    assert modelio.load(tmp_path / "native").model_cfg == modelio.load(run).model_cfg

    config = json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (
        type(model).__name__
        == config["architectures"][0]
        == FAMILIES[name][0].__name__[: -len("Config")] + ("ForCausalLM")
    )
    assert (config.get("sliding_window"), config["head_dim"]) == (
        (WINDOW, 16) if name == "mistral" else (None, 16 if name != "qwen3" else 24)
    )
    # The same tensors as the source (biases, q/k norms, tied or not), finetuned (LoRA merged into the kernels).
    exported, original = _tensors(out), _tensors(source)
    assert sorted(exported) == sorted(original)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(exported[key] - original[key]).max() > 1e-4
    if lora:  # the adapters sit beside the kernels only: biases and norms stay the base model's
        bias = "model.layers.0.self_attn.q_proj.bias"
        assert np.array_equal(exported[bias], original[bias])

    tokenizer = Tokenizer(run / "tokenizer.model")
    prompt = QA_TEXT[0]
    ids = tokenizer.encode([prompt])[0]
    assert len(ids) > WINDOW
    text = cli("generate", run, "--prompt", prompt, "--max-new-tokens", "10", "--temperature", "0").stdout
    with torch.no_grad():
        new = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=10, pad_token_id=0,
        )[0, len(ids) :].tolist()  # fmt: skip
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert text.rstrip("\n") == (prompt + tokenizer.decode(new)).rstrip("\n")


# ----------------------------------------------------------------------------------------------------------
# Bad input, recipes, and the sliding window's own attention
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["Gemma2ForCausalLM", "GPTNeoXForCausalLM"])
def test_unsupported_architectures_are_refused_in_one_line(cli, tmp_path, architecture):
    home = tmp_path / "model"
    home.mkdir()
    config = {"architectures": [architecture], "model_type": architecture[:-11].lower(), "vocab_size": 128}
    (home / "config.json").write_text(json.dumps(config))
    for args in (
        ["export", f"hf:{home}", "--out", tmp_path / "out", "--format", "hf"],
        ["finetune", "--task", "qa", "--init-from", f"hf:{home}", "--data", _squad(tmp_path / "qa.json"),
         "--run-dir", tmp_path / "out"],
    ):  # fmt: skip
        result = cli(*args, ok=False)
        assert result.exit_code != 0 and "Traceback" not in result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and architecture in lines[0], lines
        assert hf_config.SUPPORTED in lines[0] and "Qwen3ForCausalLM" in hf_config.SUPPORTED
        assert not (tmp_path / "out").exists()


def test_family_fields_round_trip_through_recipes_and_refuse_what_the_family_lacks(tmp_path):
    model = dict(architecture="mistral", sliding_window=8, rope_type="yarn", rope_factor=2.0)
    cfg = config.build_config({"model": {**model, "rope_original_max_positions": 64}}, {}, config.Config, tmp_path)
    (tmp_path / "config.toml").write_text(config.dumps(cfg))
    assert config.load_config(tmp_path / "config.toml") == cfg
    for fields, message in [
        ({"qkv_bias": True}, "model.qkv_bias=true .* needs model.architecture=qwen2, not llama"),
        ({"architecture": "qwen3"}, "model.architecture=qwen3 has RMSNorms on q and k: set model.qk_norm=true"),
        ({"sliding_window": 8}, "model.sliding_window needs model.architecture=mistral"),
        ({"architecture": "gemma"}, "model.architecture must be one of llama, mistral, qwen2, qwen3"),
        ({"rope_factor": 2.0}, "model.rope_factor has no effect with model.rope_type=default"),
        ({"rope_type": "llama3", "rope_factor": 8.0}, "needs model.rope_original_max_positions > 0"),
        ({"rope_type": "dynamic"}, "model.rope_type must be one of default, linear, llama3, yarn"),
    ]:
        with pytest.raises(UserError, match=message):
            ModelConfig(**fields)


@pytest.mark.parametrize("chunks,packed", [(1, False), (4, True)])
def test_sliding_window_chunked_attention_equals_dot_product_attention_with_gradients(chunks, packed):
    b, t, h, kv, e, window = 2, 40, 4, 2, 8, 7
    keys = jax.random.split(jax.random.key(2), 4)
    shapes = [(b, t, h, e), (b, t, kv, e), (b, t, kv, e), (b, t, h, e)]
    q, k, v, g = (jax.random.normal(key, shape) for key, shape in zip(keys, shapes, strict=True))
    segments = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (b, t)), axis=1)) if packed else None
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]

    def ours(q, k, v):
        return jnp.sum(causal_attention(q, k, v, chunks, segments, window) * g)

    def reference(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=(window - 1, 0))
        return jnp.sum(out * g)

    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(q, k, v)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        reductions = (t, e, b * t * h * e) if w.ndim == 0 else (t, e)  # as in tests/test_model_train.py
        np.testing.assert_allclose(a, w, atol=f32_tolerance(w, *reductions, chained=4), rtol=0)
    windowed, full = jax.jit(lambda q, k, v: [causal_attention(q, k, v, chunks, segments, w) for w in (window, 0)])(
        q, k, v
    )
    assert np.abs(np.asarray(full) - np.asarray(windowed)).max() > 0.1  # the window matters here


def test_transformers_4_configs_read_the_same(tmp_path):
    """rope_theta and rope_scaling ({"type": ...}) as transformers 4 wrote them; Qwen3's head_dim default."""
    home = tmp_path / "m"
    home.mkdir()
    llama31 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    base = dict(vocab_size=128, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    for fields, expected in [
        (
            dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=5e5, rope_scaling=llama31),
            dict(rope_type="llama3", rope_theta=5e5, rope_factor=8.0, rope_original_max_positions=2048, head_dim=0),
        ),
        (
            dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", max_position_embeddings=131072,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
            dict(rope_type="yarn", rope_factor=4.0, rope_original_max_positions=32768, head_dim=128, qk_norm=True),
        ),
        (  # no factor: transformers takes max_position_embeddings / original; mscale pair as DeepSeek writes it
            dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=8192,
                 rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 2048, "mscale": 2.0,
                                  "mscale_all_dim": 1.0}),
            dict(rope_factor=4.0, rope_attention_factor=(0.2 * np.log(4) + 1) / (0.1 * np.log(4) + 1)),
        ),
    ]:  # fmt: skip
        (home / "config.json").write_text(json.dumps({**base, **fields}))
        cfg, _ = hf_config.read_config(home)
        for key, value in expected.items():
            assert getattr(cfg, key) == pytest.approx(value), key


def test_param_count_covers_biases_and_norms():
    for fields in (dict(architecture="qwen2", qkv_bias=True), dict(architecture="qwen3", qk_norm=True, head_dim=24)):
        cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, **fields)
        model = nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0)))
        assert count_params(cfg)[0] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
