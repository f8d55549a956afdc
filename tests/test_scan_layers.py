"""model.scan_layers: the stacked, scanned layers train, resume, export, decode and finetune like unrolled ones."""

import dataclasses
import json
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigmodel_cli import hf, modelio, stablehlo
from bigmodel_cli.config import MeshConfig, ModelConfig
from bigmodel_cli.evaluate.generate import Sampling, generate_ids
from bigmodel_cli.model import layout
from bigmodel_cli.model.params import abstract_params, init_params
from bigmodel_cli.model.transformer import Transformer
from bigmodel_cli.parallel import make_mesh
from bigmodel_cli.serve.engine import Engine, Request
from tests.conftest import model_tolerance, pretrain_args, synthetic_text
from tests.test_finetune import PROMPT_WORDS, _task_files

# A constant learning rate: a run stopped at step 3 and resumed to 6 follows the same schedule as one run to 6.
# On one device both layouts give bit-identical gradients; on this 2x2x2 mesh the sharded reductions differ in
# their last bits, and Adam's first steps move every weight by about lr whatever its gradient's size, so weights
# with gradients near zero drift by amounts that scale with lr (at lr 3e-3, 2e-5 in loss by step 6).
SETTINGS = {
    "optim.lr": 1e-3,
    "train.steps": 6,
    "train.batch_size": 8,
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
    "train.log_every": 1,
    "train.eval_every": 0,
    "model.max_seq_len": 32,
    "optim.warmup_steps": 0,
    "optim.min_lr_ratio": 1.0,
    "checkpoint.every": 3,
}


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in lines if "loss" in row}


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory) -> dict[str, Path]:
    """The same 6 steps unrolled and scanned, and a run that switches layout at each restart."""
    root = tmp_path_factory.mktemp("scan")
    (root / "corpus.txt").write_text(synthetic_text(800) + (PROMPT_WORDS + "\n") * 30, encoding="utf-8")
    cli("preprocess", root / "corpus.txt", "--out", root / "data", "--model-type", "char")
    data = root / "data"
    cli(*pretrain_args(root / "unrolled", data, SETTINGS))
    cli(*pretrain_args(root / "scanned", data, {**SETTINGS, "model.scan_layers": "true"}))
    # unrolled to step 3, resumed scanned to 5, then unrolled again to 6: each restore converts the checkpoint
    switch = root / "switch"
    cli(*pretrain_args(switch, data, {**SETTINGS, "train.steps": 3}))
    for steps, scan in ((5, "true"), (6, "false")):
        settings = {**SETTINGS, "train.steps": steps, "model.scan_layers": scan}
        cli(*pretrain_args(switch, data, settings, "--allow-config-change"))
    return {"unrolled": root / "unrolled", "scanned": root / "scanned", "switch": switch, "root": root}


def test_scanned_and_unrolled_losses_match_and_resume_across_layouts(runs):
    unrolled, scanned, switch = (_losses(runs[k]) for k in ("unrolled", "scanned", "switch"))
    assert sorted(unrolled) == sorted(scanned) == list(range(1, 7))
    for step in unrolled:
        assert abs(unrolled[step] - scanned[step]) < 1e-5, (step, unrolled[step], scanned[step])
        # steps 4-5 ran scanned from an unrolled checkpoint, step 6 unrolled from a scanned one
        assert abs(unrolled[step] - switch[step]) < 1e-5, (step, unrolled[step], switch[step])
    assert "scan_layers = true" in (runs["scanned"] / "config.toml").read_text()


def test_same_seed_gives_the_same_weights_in_both_layouts():
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    _, unrolled = init_params(cfg, mesh, seed=1)
    _, scanned = init_params(dataclasses.replace(cfg, scan_layers=True), mesh, seed=1)
    assert scanned["layers"]["mlp"]["up_proj"].shape == (3, 32, 64)
    assert scanned["layers"]["mlp"]["up_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for name, value in layout.named(scanned).items():
        np.testing.assert_array_equal(value, np.asarray(layout.named(unrolled)[name]))
    assert layout.is_stacked(layout.stack(unrolled)) and not layout.is_stacked(layout.unstack(scanned))


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_applies_inside_the_scan_with_the_same_gradients(remat):
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 17)), jnp.int32)

    def gradients(scan: bool):
        model = Transformer(dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(0), remat=remat)
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        grads = jax.jit(jax.grad(loss))(params)
        return layout.named(nnx.to_pure_dict(grads)), str(jax.make_jaxpr(jax.grad(loss))(params))

    unrolled, _ = gradients(False)
    scanned, jaxpr = gradients(True)
    assert jaxpr.count("scan[") == 2  # one loop over the layers forward, one backward: no copy per layer
    assert "remat" in jaxpr  # the policy's recomputation, inside the loop
    for name, value in unrolled.items():
        np.testing.assert_allclose(scanned[name], value, atol=1e-7, rtol=0, err_msg=name)


def _unrolled_twin(loaded):
    """The same weights in the unrolled layout, as a LoadedModel."""
    cfg = dataclasses.replace(loaded.model_cfg, scan_layers=False)
    graphdef, _ = abstract_params(cfg, loaded.mesh)
    return dataclasses.replace(loaded, model_cfg=cfg, graphdef=graphdef, params=layout.unstack(loaded.params))


def test_hf_export_of_a_scanned_run_is_bit_identical_and_reimports(cli, runs, tmp_path):
    scanned = modelio.load(runs["scanned"])
    assert layout.is_stacked(scanned.params)
    cli("export", runs["scanned"], "--format", "hf", "--out", tmp_path / "scanned")
    (tmp_path / "unrolled").mkdir()
    hf.write(_unrolled_twin(scanned), tmp_path / "unrolled")
    for file in sorted((tmp_path / "unrolled").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "scanned" / file.name).read_bytes()
    from safetensors import safe_open

    with safe_open(tmp_path / "scanned" / "model.safetensors", framework="numpy") as f:
        assert "model.layers.1.mlp.up_proj.weight" in f.keys()  # per-layer Hugging Face names
    # an import builds the model unrolled; stacked from the same per-layer files, the weights are the same
    imported = hf.load(tmp_path / "scanned", scanned.mesh)
    like = abstract_params(dataclasses.replace(imported.model_cfg, scan_layers=True), scanned.mesh)[1]
    restacked = layout.load(like, lambda name, spec: np.asarray(layout.named(imported.params)[name]))
    np.testing.assert_array_equal(
        restacked["layers"]["self_attn"]["q_proj"], scanned.params["layers"]["self_attn"]["q_proj"]
    )
    # bigmodel's own export: per-layer tensors on disk, stacked again on load as its config says
    cli("export", runs["scanned"], "--out", tmp_path / "native")
    native = modelio.load(tmp_path / "native")
    assert native.model_cfg.scan_layers and layout.is_stacked(native.params)
    for name, value in layout.named(native.params).items():
        np.testing.assert_array_equal(value, layout.named(scanned.params)[name])


def test_generate_gives_the_same_greedy_tokens_and_logits_in_both_layouts(runs):
    scanned = modelio.load(runs["scanned"])
    unrolled = _unrolled_twin(scanned)
    prompts = [[1, 5, 9, 3], [2, 7]]
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    greedy = generate_ids(scanned, prompts, sampling)
    assert greedy == generate_ids(unrolled, prompts, sampling)
    # the serving engine's slot cache, stacked [L, B, S, K, E]: two requests batched, the same tokens
    engine = Engine(scanned, 2, 32)
    engine.start()
    try:
        answers = {i: [] for i in range(2)}
        done = [threading.Event() for _ in prompts]
        for i, prompt in enumerate(prompts):

            def emit(token, finish, i=i):
                answers[i].append(token)
                if finish:
                    done[i].set()

            engine.submit(Request(prompt, 8, emit))
        assert all(event.wait(60) for event in done)
    finally:
        engine.close()
    assert [answers[0], answers[1]] == greedy
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, scanned.model_cfg.vocab_size, (2, 16)), jnp.int32)
    a, b = (nnx.merge(m.graphdef, m.params) for m in (scanned, unrolled))
    logits = a(tokens)
    np.testing.assert_allclose(logits, b(tokens), atol=model_tolerance(logits, scanned.model_cfg, 16), rtol=0)
    _, probs_a, residual_a = a.inspect(tokens)
    _, probs_b, residual_b = b.inspect(tokens)
    assert len(probs_a) == 2 and probs_a[1].shape == probs_b[1].shape
    np.testing.assert_allclose(probs_a[1], probs_b[1], atol=1e-5)
    np.testing.assert_allclose(residual_a[0], residual_b[0], atol=1e-5)


def test_stablehlo_export_of_a_scanned_model_is_the_unrolled_artifact(runs, tmp_path):
    from safetensors.numpy import load_file

    scanned = modelio.load(runs["scanned"])
    stablehlo.write(scanned, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tensors = load_file(tmp_path / manifest["weights"])
    assert "layers.1.mlp.up_proj" in tensors  # per layer, as the unrolled model's
    forward = jax.export.deserialize((tmp_path / manifest["function"]).read_bytes())
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, scanned.model_cfg.vocab_size, (2, 8)), jnp.int32)
    got = forward.call(*[tensors[p["name"]] for p in manifest["params"]], tokens)
    want = nnx.merge(scanned.graphdef, scanned.params)(tokens)
    np.testing.assert_allclose(got, want, atol=model_tolerance(want, scanned.model_cfg, 8), rtol=0)


def test_lora_finetunes_a_scanned_model_and_exports_merged(cli, runs, tmp_path):
    run = tmp_path / "lora"
    args = _task_files(tmp_path)["summarize"]
    out = cli(
        "finetune", "--task", "summarize", "--init-from", runs["scanned"], *args, "--run-dir", run,
        "--set", "train.steps=3", "--set", "lora.rank=4", "--set", "lora.targets=all", "--set", "optim.lr=1e-2",
        "--set", "task.max_target_tokens=8",
    ).stdout  # fmt: skip
    assert "step: 3" in out
    with_adapter = modelio.load(run)
    assert with_adapter.lora is not None and layout.is_stacked(with_adapter.params)
    assert with_adapter.params["layers"]["self_attn"]["q_proj_lora_a"].shape[0] == 2  # [L, in, R]
    cli("export", run, "--format", "hf", "--out", tmp_path / "merged")
    merged = hf.load(tmp_path / "merged", with_adapter.mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, merged.model_cfg.vocab_size, (2, 16)), jnp.int32)
    a = nnx.merge(with_adapter.graphdef, with_adapter.params)(tokens)
    b = nnx.merge(merged.graphdef, merged.params)(tokens)
    np.testing.assert_allclose(a, b, atol=1e-4)
