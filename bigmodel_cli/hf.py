"""Hugging Face interop: export a directory that transformers loads (Llama, Mistral, Qwen2 or Qwen3, as the model
is); load `hf:DIR` directories of those families. config.json <-> ModelConfig lives in bigmodel_cli/hf_config.py.

Our parameter names are Hugging Face's without the `model.` prefix and `.weight` suffix (a bias `q_proj_bias`
is `q_proj.bias`), and we store kernels [in, out] where torch stores [out, in]: conversion is a rename plus a
transpose of every 2-D kernel. Nothing here imports transformers or runs code from a model directory: config.json
is parsed as JSON and weights are read from safetensors only (PyTorch .bin files are pickles, which can run code
when loaded).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bigmodel_cli import storage
from bigmodel_cli.config import ModelConfig
from bigmodel_cli.data.tokenizer import AnyTokenizer, TokenizerFiles
from bigmodel_cli.data.tokenizer_formats import read_sentencepiece, tokenizer_json
from bigmodel_cli.errors import UserError
from bigmodel_cli.hf_config import FAMILIES, hf_config, read_config
from bigmodel_cli.model import layout
from bigmodel_cli.model.params import LoadedModel, abstract_params
from bigmodel_cli.rundir import (
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TOKENIZER_JSON_FILE,
)
from bigmodel_cli.tasks import taskinfo
from bigmodel_cli.tasks.chat import ChatFormat, chat_format, exported_template

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size ("5GB")
DTYPES = ("float32", "bfloat16")  # parameter dtypes an export stores (export's --dtype choices)
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"  # the stop tokens transformers' generate uses
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle checkpoints
# The safetensors dtypes bigmodel loads, and the param_dtype each becomes: float16 widens to float32 without loss;
# bfloat16 stays bfloat16 so that re-export is bit-identical.
STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float32"}
CONFIG_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # config.json's dtype names for them
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on a header


# ----------------------------------------------------------------------------------------------------------
# Names and layouts
# ----------------------------------------------------------------------------------------------------------


def hf_name(name: str) -> str:
    """'layers.0.mlp.up_proj' -> 'model.layers.0.mlp.up_proj.weight', the transformers state-dict key;
    'layers.0.self_attn.q_proj_bias' -> 'model.layers.0.self_attn.q_proj.bias'."""
    if name == "lm_head":
        return "lm_head.weight"
    if name.endswith("_proj_bias"):
        return f"model.{name.removesuffix('_bias')}.bias"
    return f"model.{name}" if name.endswith(".weight") else f"model.{name}.weight"


def _is_kernel(name: str) -> bool:
    """Linear kernels are stored transposed by torch; the embedding table [V, D] is not."""
    return name == "lm_head" or name.endswith("_proj")


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def write(loaded: LoadedModel, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """Write config, generation config, safetensors weights and tokenizer files into an empty directory.

    Tensors keep the parameters' dtype (bigmodel_cli.export casts them for --dtype).
    """
    if max_shard_bytes <= 0:
        raise UserError(f"--max-shard-bytes must be positive, got {max_shard_bytes}")
    flat = layout.named(loaded.params)  # per-layer names in either layout (model.scan_layers)
    expected = set(layout.named(abstract_params(loaded.model_cfg, loaded.mesh)[1]))
    if set(flat) != expected:
        odd = sorted(set(flat) ^ expected)[0]
        raise UserError(f"parameter {odd} does not fit the model (LoRA adapters?): export the merged model")
    dtypes = {str(v.dtype) for v in flat.values()}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise UserError(f"parameters of dtype {', '.join(sorted(dtypes))}: export with --dtype float32 or bfloat16")
    _write_weights(flat, directory, max_shard_bytes)
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tokenizer_files = loaded.tokenizer_files
    if tokenizer_files is not None:
        tokenizer = tokenizer_files.open()
        _write_tokenizer(tokenizer_files, tokenizer, directory, loaded.seq_len)
        ids = {
            f"{kind}_token_id": i if i >= 0 else None
            for kind, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))
        }
    config = hf_config(loaded.model_cfg, max(loaded.seq_len, loaded.model_cfg.max_seq_len), dtypes.pop(), ids)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    info = taskinfo.read(loaded.home)
    if tokenizer_files is not None and info is not None and info.chat_template:
        ids["eos_token_id"] = generation_eos(tokenizer, info.chat_template)
    # The source's own stop tokens stay (a Llama 3 Instruct export must still stop at <|eot_id|>).
    eos = ids["eos_token_id"]
    stops = eos if isinstance(eos, list) else [] if eos is None else [eos]
    stops += [i for i in generation_stop_ids(loaded.home) if i not in stops]
    ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops or None
    (directory / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2) + "\n")
    _write_task(loaded.home, directory)


def generation_stop_ids(home: Path) -> tuple[int, ...]:
    """The eos_token_id of a model directory's generation_config.json (one id, or a list such as Llama 3
    Instruct's <|end_of_text|> and <|eot_id|>): where transformers' generate stops; () without one."""
    value = (storage.read_json_object(storage.path(home) / GENERATION_CONFIG) or {}).get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0)


def generation_eos(tokenizer: AnyTokenizer, chat_template: str) -> int | list[int] | None:
    """generation_config's eos_token_id for a chat model: EOS, and the token that closes an assistant turn where
    the template closes turns with a token of its own (ChatML's <|im_end|> on a base model whose EOS is
    <|endoftext|>), so that transformers' generate stops where bigmodel's does."""
    eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
    marker = tokenizer.encode([ChatFormat(chat_template, chat_format(tokenizer).special_tokens).end_of_turn])[0]
    if len(marker) != 1 or marker[0] == eos:
        return eos
    return marker if eos is None else [eos, marker[0]]


def _write_task(home: Path, directory: Path) -> None:
    """The finetuned task's task.json, and an instruct model's chat template where transformers reads it."""
    info = taskinfo.read(home)
    if info is None:
        return
    taskinfo.copy(home, directory)
    tokenizer_config = directory / "tokenizer_config.json"
    if info.chat_template and tokenizer_config.is_file():
        config = json.loads(tokenizer_config.read_text())
        config["chat_template"] = exported_template(info.chat_template)
        if config["chat_template"] != info.chat_template:  # the EOS it opens with must read as the token
            config["split_special_tokens"] = False
        tokenizer_config.write_text(json.dumps(config, indent=2) + "\n")


def _write_weights(flat: dict[str, Any], directory: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or numbered shards plus model.safetensors.index.json above max_shard_bytes."""
    from safetensors.numpy import save_file

    sizes = {n: int(np.prod(v.shape)) * v.dtype.itemsize for n, v in flat.items()}
    shards: list[list[str]] = [[]]
    for name in flat:  # fill shards in order; a tensor larger than the limit gets a shard of its own
        if shards[-1] and sum(sizes[n] for n in shards[-1]) + sizes[name] > max_shard_bytes:
            shards.append([])
        shards[-1].append(name)
    files = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, names in zip(files, shards, strict=True):  # one shard in host memory at a time
        tensors = {}
        for name in names:
            array = np.asarray(jax.device_get(flat[name]))
            tensors[hf_name(name)] = np.ascontiguousarray(array.T if _is_kernel(name) else array)
        save_file(tensors, directory / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {hf_name(n): f for f, names in zip(files, shards, strict=True) for n in names},
        }
        (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(files: TokenizerFiles, tokenizer: AnyTokenizer, directory: Path, seq_len: int) -> None:
    """The tokenizer's files, with a tokenizer_config.json whose BOS/EOS settings say what bigmodel does with
    the model: transformers then encodes a prompt exactly as bigmodel does."""
    if files.is_json:
        _write_tokenizer_json(files, tokenizer, directory, seq_len)
    else:
        _write_sentencepiece(files.main, tokenizer, directory, seq_len)


def _write_tokenizer_json(files: TokenizerFiles, tokenizer: AnyTokenizer, directory: Path, seq_len: int) -> None:
    """tokenizer.json as it is (its post-processor adds what bigmodel adds), and the model's own config."""
    storage.copy_file(files.main, directory / TOKENIZER_JSON_FILE)
    config: dict[str, Any] = storage.read_json_object(files.main.parent / TOKENIZER_CONFIG_FILE) or {}
    # Without a class, transformers would pick the model type's (LlamaTokenizer), which rebuilds the pipeline
    # from the vocabulary; the generic class uses tokenizer.json verbatim.
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.update(add_bos_token=tokenizer.add_bos, add_eos_token=tokenizer.add_eos, model_max_length=seq_len)
    for kind, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if i >= 0:  # named for transformers where the config leaves it to the post-processor
            config.setdefault(f"{kind}_token", tokenizer.pieces([i])[0])
    if tokenizer.chat_template:  # from chat_template.jinja too: one place, where _write_task may replace it
        config["chat_template"] = tokenizer.chat_template
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for companion in files.companions:  # a tokenizer.model it restates, the older special-tokens file
        if companion.name in (TOKENIZER_FILE, SPECIAL_TOKENS_MAP_FILE):
            storage.copy_file(companion, directory / companion.name)


def _write_sentencepiece(model_file: Path, tokenizer, directory: Path, seq_len: int) -> None:
    """tokenizer.model plus the files AutoTokenizer needs, set up to give exactly our ids."""
    storage.copy_file(model_file, directory / TOKENIZER_FILE)  # model_file may be in a bucket
    sp = tokenizer.sp
    special = {
        f"{kind}_token": sp.id_to_piece(i)
        for kind, i in (
            ("bos", tokenizer.bos_id),
            ("eos", tokenizer.eos_id),
            ("unk", sp.unk_id()),
            ("pad", tokenizer.pad_id),
        )
        if i >= 0
    }
    bos = (special["bos_token"], tokenizer.bos_id) if tokenizer.add_bos else None
    eos = (special["eos_token"], tokenizer.eos_id) if tokenizer.add_eos else None
    fast = tokenizer_json(model_file.read_bytes(), bos, eos)
    config: dict[str, Any] = {
        # The generic fast class uses tokenizer.json verbatim. LlamaTokenizer would replace its normaliser
        # and pre-tokenizer with its own, which put the dummy-prefix space differently from SentencePiece
        # (none before text that starts with a space, one even when the model has none).
        "tokenizer_class": "PreTrainedTokenizerFast",
        # What bigmodel adds: nothing for the tokenizers it trains; what the model's config says for others.
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": tokenizer.add_eos,
        # SentencePiece reads "<s>" in text as characters; transformers would otherwise read a control token.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": seq_len,
        **special,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    if fast is not None:
        (directory / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False, indent=1) + "\n")
    else:  # a normalising model: transformers converts tokenizer.model itself, closely but not exactly
        config["tokenizer_class"] = "LlamaTokenizer"
        config["add_prefix_space"] = read_sentencepiece(model_file.read_bytes()).add_dummy_prefix
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------


def weight_map(home: Path) -> dict[str, str] | None:
    """The sharded weights' index: HF tensor name -> shard file name; None when the weights are not sharded."""
    index = storage.read_json_object(home / WEIGHTS_INDEX)
    if index is None:
        return None
    shards = index.get("weight_map")
    if not isinstance(shards, dict) or not all(isinstance(f, str) for f in shards.values()):
        raise UserError(f"{home / WEIGHTS_INDEX} is not a safetensors index (no weight_map)")
    return shards


def _weight_files(home: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it; refuses pickle checkpoints."""
    shards = weight_map(home)
    if shards is not None:
        return {name: home / file for name, file in shards.items()}
    if (home / WEIGHTS).is_file():
        return dict.fromkeys(_header(home / WEIGHTS), home / WEIGHTS)
    _refuse_pickles(home)
    raise UserError(f"{home} has no {WEIGHTS} or {WEIGHTS_INDEX}: pass a directory saved with safetensors")


def _refuse_pickles(home: Path) -> None:
    """Pickle checkpoints can run code when loaded: refuse a directory that only has those."""
    if (home / WEIGHTS).is_file() or (home / WEIGHTS_INDEX).is_file():
        return
    pickles = sorted(p.name for p in home.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{home} holds PyTorch pickle weights ({pickles[0]}), which can run code when loaded, so "
            "bigmodel refuses them: convert them to safetensors where you trust the files (transformers: "
            "from_pretrained(DIR).save_pretrained(NEW_DIR)) and pass hf:NEW_DIR"
        )


def read_model_config(home: Path) -> tuple[ModelConfig, int]:
    """What load() makes of home's config.json, param_dtype included, reading no tensor (for `plan`): the dtype
    is the stored embedding's, from its safetensors header; without the weights here (a Hub model planned from
    its config.json alone), the dtype config.json declares."""
    _refuse_pickles(home)
    model_cfg, seq_len = read_config(home)
    name = hf_name("embed_tokens")
    files = _weight_files(home) if (home / WEIGHTS).is_file() or (home / WEIGHTS_INDEX).is_file() else {}
    if files.get(name) and files[name].is_file():
        stored = _header(files[name])[name]["dtype"]
    else:  # transformers saves the weights' dtype as "dtype" (5.x) or "torch_dtype" (4.x), and reads float32 without
        config = storage.read_json_object(home / "config.json") or {}
        declared = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        stored = CONFIG_DTYPES.get(declared, declared)
    if stored not in STORED_DTYPES:
        raise UserError(f"{home}: weights of dtype {stored} are not supported: F32, BF16 or F16 only")
    return dataclasses.replace(model_cfg, param_dtype=STORED_DTYPES[stored]), seq_len


def _header(file: Path) -> dict[str, dict]:
    """A safetensors file's header, {tensor name: {"dtype", "shape", "data_offsets"}}, read without its data
    (the format: an 8-byte little-endian length, then that many bytes of JSON). safetensors' own reader checks
    the data too, which `plan` of a Hub model whose weights were never fetched must not need."""
    try:
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= MAX_HEADER_BYTES else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if isinstance(header, dict):
        header.pop("__metadata__", None)  # the file's own string metadata, not a tensor
    if not isinstance(header, dict) or not all(isinstance(v, dict) and "dtype" in v for v in header.values()):
        raise UserError(f"{file} is not a safetensors file (no readable header): download it again")
    return header


def load(home: Path, mesh) -> LoadedModel:
    """A Hugging Face directory of a supported family (safetensors, one file or sharded) as a LoadedModel."""
    from safetensors import SafetensorError, safe_open

    model_cfg, seq_len = read_model_config(home)  # first: a pickle checkpoint is refused whatever its config says
    files = _weight_files(home)
    absent = sorted({file.name for file in files.values() if not file.is_file()})
    if absent:  # a download stopped part way: say so before the first tensor is read
        raise UserError(
            f"{home}: {absent[0]} ({len(absent)} of the shards {WEIGHTS_INDEX} names) is missing: download the "
            "model again"
        )

    def read(name: str):
        """One tensor, through a file opened for it alone: a memory map held open across the whole load would
        keep every page it touched resident (counted in the process's RSS) until the end."""
        if name not in files:
            raise UserError(f"{home}: tensor {name} is missing from the weights")
        try:
            with safe_open(files[name], framework="numpy") as f:
                return f.get_tensor(name)
        except SafetensorError as err:  # a file cut short (an interrupted download) or overwritten
            raise UserError(f"{files[name]} is damaged or incomplete ({err}): download it again") from None

    graphdef, like = abstract_params(model_cfg, mesh)
    wanted = {hf_name(name) for name in layout.named(like)}
    ignorable = {"lm_head.weight"} if model_cfg.tie_embeddings else set()
    extra = sorted(n for n in set(files) - wanted - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise UserError(
            f"{home}: unexpected tensor {extra[0]} ({len(extra)} in all): not a plain "
            f"{FAMILIES[model_cfg.architecture].hf_class} checkpoint"
        )

    def take(name, spec):
        array = read(hf_name(name))
        expected = spec.shape[::-1] if _is_kernel(name) else spec.shape
        if array.shape != expected:
            raise UserError(f"{home}: tensor {hf_name(name)} has shape {array.shape}; config.json implies {expected}")
        # One host copy at most (transpose and dtype in one go), freed once the tensor is on its devices.
        return np.ascontiguousarray(array.T if _is_kernel(name) else array, dtype=spec.dtype)

    params = layout.load(like, take)
    return LoadedModel(model_cfg, graphdef, params, mesh, home, 0, seq_len, "")
