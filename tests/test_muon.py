"""optim.name = muon: the decoder layers' matrices take orthogonalized updates, the rest AdamW, in both layouts."""

import jax
import numpy as np
import pytest

from bigmodel_cli.config import MeshConfig, ModelConfig, OptimConfig
from bigmodel_cli.model import layout
from bigmodel_cli.model.params import init_params
from bigmodel_cli.parallel import make_mesh
from bigmodel_cli.train.optim import make_optimizer
from tests.conftest import pretrain_args
from tests.test_scan_layers import SETTINGS as SCAN_SETTINGS
from tests.test_scan_layers import _losses

LR = 1e-2
CONSTANT = dict(lr=LR, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=0.0)


def _gradients(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)])


def _first_update(name: str, params, grads):
    tx = make_optimizer(OptimConfig(name=name, **CONSTANT), total_steps=10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return layout.named(updates)


@pytest.fixture(scope="module")
def unrolled_params():
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    return init_params(cfg, make_mesh(MeshConfig(data=8)), seed=0)[1]


def test_layer_matrices_get_orthogonal_updates_and_embeddings_adam_ones(unrolled_params):
    grads = _gradients(unrolled_params)
    muon, adamw = _first_update("muon", unrolled_params, grads), _first_update("adamw", unrolled_params, grads)
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        singular = np.linalg.svd(np.asarray(muon[name]), compute_uv=False)
        # Newton-Schulz leaves every singular value near one (0.7-1.2 for Muon's quintic), times lr and the
        # RMS-matching scale 0.2 * sqrt(max(in, out)); AdamW's sign-like first step spreads them 3x and more.
        scale = LR * 0.2 * max(muon[name].shape) ** 0.5
        assert 0.6 < singular.min() / scale and singular.max() / scale < 1.3, singular / scale
        adam_singular = np.linalg.svd(np.asarray(adamw[name]), compute_uv=False)
        assert adam_singular.max() / adam_singular.min() > 3
    # Adam (with Nesterov momentum, as Muon pairs it): the first step moves every weight by the same amount,
    # lr * (1 + b1 / (1 + b1)) for b1 = 0.9, whatever its gradient's size
    for name in ("embed_tokens", "lm_head", "layers.0.input_layernorm.weight"):
        np.testing.assert_allclose(np.abs(np.asarray(muon[name])), LR * (1 + 0.9 / 1.9), rtol=1e-3)


def test_stacked_layers_are_orthogonalized_layer_by_layer(unrolled_params):
    grads = _gradients(unrolled_params)
    unrolled = _first_update("muon", unrolled_params, grads)
    stacked = _first_update("muon", layout.stack(unrolled_params), layout.stack(grads))
    assert unrolled.keys() == stacked.keys()
    for name, value in unrolled.items():
        np.testing.assert_allclose(np.asarray(stacked[name]), np.asarray(value), rtol=1e-4, atol=1e-7)


def test_unrolled_layers_are_updated_stacked_but_keep_their_state_layout(unrolled_params):
    tx = make_optimizer(OptimConfig(name="muon", **CONSTANT), total_steps=10)
    state = tx.init(unrolled_params)
    _, new_state = jax.jit(tx.update)(_gradients(unrolled_params), state, unrolled_params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state) and not layout.is_stacked(new_state)
    assert layout.is_stacked(layout.stack(state))  # the state does hold layers a stacking would convert


# The scan tests' sharded settings (2x2x2 mesh, constant lr 1e-3), with Muon, 4 steps, a checkpoint every 2.
SETTINGS = {**SCAN_SETTINGS, "optim.name": "muon", "train.steps": 4, "checkpoint.every": 2}


def test_a_sharded_muon_run_resumes_in_the_other_layout_with_the_same_losses(cli, tiny_data, tmp_path):
    straight, switch = tmp_path / "straight", tmp_path / "switch"
    cli(*pretrain_args(straight, tiny_data, SETTINGS))
    cli(*pretrain_args(switch, tiny_data, {**SETTINGS, "train.steps": 2, "model.scan_layers": "true"}))
    cli(*pretrain_args(switch, tiny_data, SETTINGS, "--allow-config-change"))  # Muon's state restored unrolled
    expected, resumed = _losses(straight), _losses(switch)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4]
    for step in expected:
        assert abs(expected[step] - resumed[step]) < 1e-5, (step, expected[step], resumed[step])
    assert 'name = "muon"' in (straight / "config.toml").read_text()
