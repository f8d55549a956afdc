"""A model's parameters as every stage holds them: the LoadedModel, parameter names, and the one place that
builds the abstract (shape, dtype, sharding) parameter tree."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from bigmodel_cli import parallel
from bigmodel_cli.config import ModelConfig
from bigmodel_cli.data.tokenizer import AnyTokenizer, TokenizerFiles, find_files, open_tokenizer
from bigmodel_cli.model.lora import Build, LoraConfig, ShapesOnly
from bigmodel_cli.model.transformer import Transformer


@dataclass
class LoadedModel:
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: Any  # pure dict of jax arrays, laid out on `mesh`
    mesh: Any
    home: Path  # the run or export directory: where the tokenizer's files and metrics.json live
    step: int
    seq_len: int  # the sequence length the model was trained with
    data_path: str  # the data it was trained on ("" if unknown)
    lora: Any = None  # the LoraConfig when params hold adapters beside the (frozen) base weights
    base_digest: str | None = None  # a finetuning run's record of its starting model's weights (checkpoint.digest)

    @property
    def tokenizer_files(self) -> TokenizerFiles | None:
        """The model's tokenizer files (tokenizer.json or tokenizer.model, and their config); None without one."""
        return find_files(self.home)

    def tokenizer(self, needed_for: str) -> AnyTokenizer:
        """The model's tokenizer; without one, a UserError saying what needed it."""
        return open_tokenizer(self.home, needed_for)


def abstract_params(model_cfg: ModelConfig, mesh, remat: str = "none") -> tuple[nnx.GraphDef, Any]:
    """Graph and shape/dtype/sharding tree of the parameters, without allocating them.

    remat (train.remat) is part of the graph: it decides what the train step recomputes in its backward pass.
    """
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=ShapesOnly(), remat=remat))
    graphdef, state = nnx.split(abstract)
    shardings = parallel.param_shardings(state, mesh)
    shapes = nnx.to_pure_dict(state)
    return graphdef, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_params(model_cfg: ModelConfig, mesh, seed: int, remat: str = "none") -> tuple[nnx.GraphDef, Any]:
    """(graphdef, params) freshly initialised from seed, every parameter created directly in its sharding."""
    graphdef, like = abstract_params(model_cfg, mesh, remat)

    def make():
        return nnx.to_pure_dict(nnx.split(_model(model_cfg, seed, remat))[1])

    with parallel.activate(mesh):
        params = jax.jit(make, out_shardings=jax.tree.map(lambda s: s.sharding, like))()
    return graphdef, params


def _model(model_cfg: ModelConfig, seed: int, remat: str) -> Transformer:
    return Transformer(model_cfg, rngs=nnx.Rngs(seed), remat=remat)


def with_adapters(model_cfg: ModelConfig, lora: LoraConfig) -> Build:
    """The builder of the model with LoRA adapters, which model/lora.py's functions take."""
    return functools.partial(Transformer, model_cfg, lora=lora)
