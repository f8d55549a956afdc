"""StableHLO export: a process with only jax, numpy and safetensors reproduces the live model's logits."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bigmodel_cli import export, stablehlo
from bigmodel_cli.evaluate import generate
from tests.conftest import model_tolerance
from tests.test_hf import ours, tiny_loaded

# What a serving process runs: no bigmodel import anywhere, only the files and the manifest.
SERVE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from safetensors.numpy import load_file

    results = {}
    for directory in sys.argv[2:]:
        manifest = json.load(open(f"{directory}/manifest.json"))
        forward = jax.export.deserialize(open(f"{directory}/{manifest['function']}", "rb").read())
        tensors = load_file(f"{directory}/{manifest['weights']}")
        weights = [jax.device_put(tensors[p["name"]]) for p in manifest["params"]]
        call = jax.jit(forward.call)
        for batch, length in SHAPES:
            tokens = np.random.default_rng(batch).integers(0, 96, (batch, length)).astype(np.int32)
            results[f"{directory}:{batch}"] = np.asarray(call(*weights, tokens))
    assert "bigmodel_cli" not in sys.modules
    np.savez(sys.argv[1], **results)
""")
SHAPES = [(2, 9), (5, 17), (1, 1)]  # batch sizes and lengths: all different from anything seen at export


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_loaded(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def exports(loaded, tmp_path_factory):
    """The model exported once per dtype, for both tests."""
    root = tmp_path_factory.mktemp("exports")
    return {dtype: export.export(loaded, root / dtype, "stablehlo", dtype=dtype) for dtype in ("float32", "bfloat16")}


def test_stablehlo_round_trip_matches_the_live_model(loaded, exports, tmp_path):
    for dtype, out in exports.items():
        manifest = json.loads((out / stablehlo.MANIFEST).read_text())
        assert manifest["inputs"][0]["shape"] == ["batch", "length"]
        assert manifest["outputs"][0] == {
            "name": "logits",
            "shape": ["batch", "length", 96],
            "dtype": "float32",
        }
        assert [p["name"] for p in manifest["params"]][:2] == [
            "embed_tokens",
            "layers.0.input_layernorm.weight",
        ]
        assert {p["dtype"] for p in manifest["params"]} == {dtype}
        assert set(manifest["platforms"]) == set(stablehlo.PLATFORMS)
        assert "stablehlo" in (out / stablehlo.MLIR).read_text()
        # The weights are arguments, not constants baked into the function.
        exported = jax.export.deserialize((out / stablehlo.FUNCTION).read_bytes())
        assert len(exported.in_avals) == len(manifest["params"]) + 1

    script = f"SHAPES = {SHAPES!r}\n{SERVE}"
    env = {
        **os.environ,
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
    }  # compiles in half the time; same numerics here
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "served.npz"), *map(str, exports.values())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    served = np.load(tmp_path / "served.npz")
    for dtype, out in exports.items():
        # The model computes in float32 whatever its weights' dtype: the bfloat16 weights widened back to
        # float32 are the same numbers, and reuse the float32 forward's compiled program.
        params = jax.tree.map(lambda x, d=dtype: x.astype(d).astype(np.float32), loaded.params)
        live = dataclasses.replace(loaded, params=params)
        for batch, length in SHAPES:
            tokens = np.random.default_rng(batch).integers(0, 96, (batch, length))
            want = ours(live, tokens)
            # Compiled with and without optimisations. Here: up to 1.4e-5 (1.5e-5 on an AVX2 host), against
            # 1.5e-4 to 2.1e-4; a RoPE base of 5e5 for 1e4 moves the logits by 9, a missing layer by 8.
            np.testing.assert_allclose(
                served[f"{out}:{batch}"],
                want,
                atol=model_tolerance(want, loaded.model_cfg, length),
                rtol=0,
                err_msg=f"{dtype}, batch {batch}",
            )


# Generation the way a server runs it: prefill right-padded prompts against a zero cache, then one token a step.
SERVE_DECODE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from safetensors.numpy import load_file

    directory, out, prompts, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    manifest = json.load(open(f"{directory}/manifest.json"))
    spec = manifest["decode"]
    step = jax.jit(jax.export.deserialize(open(f"{directory}/{spec['function']}", "rb").read()).call)
    tensors = load_file(f"{directory}/{manifest['weights']}")
    weights = [jax.device_put(tensors[p["name"]]) for p in manifest["params"]]
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    _, _, kv_heads, head_dim = spec["cache"]["shape"]
    shape = (len(prompts), lengths.max() + new, kv_heads, head_dim)
    cache = [np.zeros(shape, spec["cache"]["dtype"])] * (2 * spec["cache"]["layers"])
    logits, *cache = step(*weights, tokens, np.zeros(len(prompts), np.int32), *cache)
    token = np.argmax(np.asarray(logits)[np.arange(len(prompts)), lengths - 1], axis=-1).astype(np.int32)
    generated = [token]
    for i in range(new - 1):
        logits, *cache = step(*weights, token[:, None], lengths + i, *cache)
        token = np.argmax(np.asarray(logits)[:, 0], axis=-1).astype(np.int32)
        generated.append(token)
    assert "bigmodel_cli" not in sys.modules
    np.save(out, np.stack(generated, axis=1))
""")


def test_stablehlo_decode_generates_the_live_models_tokens(loaded, exports, tmp_path):
    out = exports["float32"]
    manifest = json.loads((out / stablehlo.MANIFEST).read_text())
    assert manifest["decode"]["cache"] == {
        "layers": 2,
        "order": ["k", "v"],
        "shape": ["batch", "cache_length", 2, 16],
        "dtype": "float32",
    }
    prompts = [[5, 17, 3, 44, 9, 60, 2], [71, 8]]  # unequal lengths: the shorter row is right-padded
    new = 32
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_DECODE, str(out), str(tmp_path / "served.npy"), json.dumps(prompts), str(new)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert proc.returncode == 0, proc.stderr
    served = np.load(tmp_path / "served.npy").tolist()
    live = generate.generate_ids(loaded, prompts, generate.Sampling(max_new_tokens=new, temperature=0))
    assert served == live
    assert len({tuple(row) for row in served}) == 2 and all(len(set(row)) > 3 for row in served)  # not degenerate
