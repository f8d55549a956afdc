"""Model numerics, the train step's accumulation, and sharding equivalence over meshes."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigmodel_cli import parallel
from bigmodel_cli.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from bigmodel_cli.data.loader import SyntheticBatches
from bigmodel_cli.model.transformer import (
    Transformer,
    apply_rope,
    causal_attention,
    count_params,
    dense,
    rope_tables,
)
from bigmodel_cli.train.loop import jit_train_step, make_state

GOLDEN = Path(__file__).parent / "golden" / "partition_specs.json"
SMALL = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)


def _cfg(model: ModelConfig = SMALL, **train) -> Config:
    return Config(
        model=model, optim=OptimConfig(lr=1e-2, warmup_steps=2), train=TrainConfig(steps=5, batch_size=8, **train)
    )


def test_param_count_matches_the_model():
    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(SMALL)[0] == real
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    assert count_params(tied)[0] == real - SMALL.d_model * SMALL.vocab_size


@pytest.mark.parametrize("chunks", [1, 3, 8])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_attention_equals_dot_product_attention_with_gradients(chunks, packed):
    b, t, h, kv, e = 2, 50, 4, 2, 8  # GQA, and 50 queries that no chunk count divides evenly
    keys = jax.random.split(jax.random.key(1), 4)
    shapes = [(b, t, h, e), (b, t, kv, e), (b, t, kv, e), (b, t, h, e)]
    q, k, v, g = (jax.random.normal(key, shape) for key, shape in zip(keys, shapes, strict=True))
    segments = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 4, (b, t)), axis=1)) if packed else None
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]

    def ours(q, k, v):
        return jnp.sum(causal_attention(q, k, v, chunks, segments) * g)

    def reference(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla") * g)

    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, w, atol=5e-5, rtol=1e-5)


def test_attention_implementations_give_the_same_loss():
    tokens = jnp.arange(2 * 16).reshape(2, 16) % SMALL.vocab_size
    logits = {
        name: Transformer(dataclasses.replace(SMALL, attention=name, attention_chunks=3), rngs=nnx.Rngs(0))(tokens)
        for name in ("chunked", "xla")
    }
    np.testing.assert_allclose(logits["chunked"], logits["xla"], atol=1e-5)


def test_attention_is_causal():
    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    tokens = jnp.arange(12).reshape(1, 12) % SMALL.vocab_size
    changed = tokens.at[0, 7].set(50)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert np.abs(a[0, 7:] - b[0, 7:]).max() > 1e-4


def test_rope_scores_depend_only_on_relative_position():
    key = jax.random.key(0)
    q, k = jax.random.normal(key, (2, 1, 1, 1, 8))

    def score(pq, pk):
        cq, sq = rope_tables(jnp.array([[pq]]), 8, 10000.0)
        ck, sk = rope_tables(jnp.array([[pk]]), 8, 10000.0)
        return jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk))

    assert score(5, 2) == pytest.approx(float(score(13, 10)), abs=1e-5)
    cos, sin = rope_tables(jnp.zeros((1, 1), jnp.int32), 8, 10000.0)
    np.testing.assert_allclose(apply_rope(q, cos, sin), q, atol=1e-7)


def test_dense_custom_vjp_matches_autodiff():
    x = jax.random.normal(jax.random.key(1), (3, 5, 7))
    w = jax.random.normal(jax.random.key(2), (7, 4))
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w))), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain, strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _run_steps(cfg: Config, mesh, batches, steps=3):
    graphdef, tx, state = make_state(cfg, mesh)
    step = jit_train_step(graphdef, tx, cfg.train.grad_accum, state, mesh)
    sharding = parallel.batch_sharding(mesh)
    losses = []
    with parallel.activate(mesh):
        for i in range(steps):
            state, metrics = step(state, {k: jax.device_put(v, sharding) for k, v in batches(i).items()})
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"])


def _uneven_batches(step):
    batch = SyntheticBatches(SMALL.vocab_size, 16, 8, seed=0)(step)
    rng = np.random.default_rng(step)
    # Rows keep very different numbers of tokens, so micro-batch means would weight tokens unequally.
    lengths = rng.integers(1, 17, size=8)
    batch["weights"] = (np.arange(16)[None, :] < lengths[:, None]).astype(np.float32)
    return batch


def test_gradient_accumulation_equals_one_big_batch():
    mesh = parallel.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    whole, p1 = _run_steps(_cfg(grad_accum=1), mesh, _uneven_batches)
    accum, p4 = _run_steps(_cfg(grad_accum=4), mesh, _uneven_batches)
    np.testing.assert_allclose(whole, accum, rtol=1e-6)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=False))
    assert diff <= 1e-6


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_meshes_match_single_device(shape):
    data, fsdp, tensor = shape
    single = parallel.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    mesh = parallel.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    batches = SyntheticBatches(SMALL.vocab_size, 16, 8, seed=1)
    cfg = _cfg(dataclasses.replace(SMALL, attention_chunks=3))  # attention blocks split over sharded heads too
    reference, _ = _run_steps(cfg, single, batches, steps=5)
    sharded, _ = _run_steps(cfg, mesh, batches, steps=5)
    np.testing.assert_allclose(sharded, reference, atol=1e-5, rtol=0)


def _specs(mesh) -> dict[str, str]:
    abstract = nnx.eval_shape(lambda: Transformer(SMALL, rngs=nnx.Rngs(0)))
    shardings = parallel.param_shardings(nnx.split(abstract)[1], mesh)
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): str(s.spec) for path, s in flat}


def test_partition_specs_match_golden_snapshot():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert _specs(mesh) == json.loads(GOLDEN.read_text())


def test_mesh_size_mismatch_names_what_fits():
    from bigmodel_cli.errors import UserError

    with pytest.raises(UserError, match="product is 8"):
        parallel.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))


def test_recipe_rules_override_the_defaults():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="embed=, mlp=fsdp+tensor"))
    try:
        specs = _specs(mesh)
        assert specs["layers.0.mlp.gate_proj"] == "P(None, ('fsdp', 'tensor'))"
        assert specs["layers.0.self_attn.q_proj"] == "P(None, 'tensor')"
    finally:
        parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # back to the default rules
    from bigmodel_cli.errors import UserError

    with pytest.raises(UserError, match="logical names"):
        parallel.parse_rules("embeddings=fsdp")


def test_custom_cross_entropy_matches_optax_value_and_gradient():
    import optax

    from bigmodel_cli.train.step import weighted_cross_entropy

    key = jax.random.key(3)
    logits = 3 * jax.random.normal(key, (2, 5, 11))
    targets = jax.random.randint(jax.random.key(4), (2, 5), 0, 11)
    weights = (jax.random.uniform(jax.random.key(5), (2, 5)) > 0.3).astype(jnp.float32)

    def reference(x):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights)

    ours = jax.value_and_grad(lambda x: weighted_cross_entropy(x, targets, weights))(logits)
    theirs = jax.value_and_grad(reference)(logits)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-6)
