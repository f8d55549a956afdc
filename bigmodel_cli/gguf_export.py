"""`bigmodel export --format gguf`: one GGUF file for llama.cpp and Ollama, written with the `gguf` package.

It follows what llama.cpp's convert_hf_to_gguf.py writes for the same Hugging Face model:
- architecture `llama` for Llama and Mistral, `qwen2` (q/k/v biases), `qwen3` (q/k norms); tensor names from
  gguf's own TensorNameMap over the Hugging Face names; the output head omitted when tied to the embedding.
- `llama` rotates interleaved pairs (GPT-J style) where Hugging Face, and bigmodel, rotate halves: the rows of
  q and k are permuted per head so that llama.cpp's pairs (2i, 2i+1) are our (i, i + E/2). qwen2 and qwen3 use
  llama.cpp's NeoX RoPE, which rotates halves: no permutation.
- RoPE scaling: linear and yarn as rope.scaling.* keys; llama3 as a `rope_freqs` tensor of per-frequency
  divisors, the way llama.cpp applies it.
- The tokenizer: SentencePiece as tokenizer model "llama" (pieces, scores, types), byte-level BPE from
  tokenizer.json as "gpt2" (tokens, types, merges, and the pre-tokenizer named by its split regex); BOS/EOS/PAD
  ids, whether a prompt gets BOS/EOS (what bigmodel adds), and the chat template.
- Quantization by gguf.quants: 1-D tensors (norms, biases) stay F32; 2-D weights become the chosen type where
  their rows divide into its blocks, else F16. With q4_0 the output head (or the tied embedding that serves as
  one) is Q8_0: llama.cpp's quantizer also keeps it finer (Q6_K, which gguf-py cannot write).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

import jax
import numpy as np

from bigmodel_cli import storage
from bigmodel_cli.config import ModelConfig
from bigmodel_cli.data.tokenizer import AnyTokenizer, Tokenizer, TokenizerFiles
from bigmodel_cli.data.tokenizer_formats import UNKNOWN, read_sentencepiece
from bigmodel_cli.errors import UserError
from bigmodel_cli.hf import generation_eos, hf_name
from bigmodel_cli.model import layout
from bigmodel_cli.model.params import LoadedModel
from bigmodel_cli.modelio import warn
from bigmodel_cli.tasks import taskinfo
from bigmodel_cli.tasks.chat import exported_template

QUANTS = ("f16", "bf16", "q8_0", "q4_0")  # export's --quant choices
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # ours -> llama.cpp's
# Byte-level BPE pre-tokenizers llama.cpp implements, by the regex that splits text before the merges
# (tokenizer.json's Split pattern; None: GPT-2's, which ByteLevel applies itself with use_regex).
_LETTERS_DIGITS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    None: "gpt-2",
    _LETTERS_DIGITS + "{1,3}" + _REST: "llama-bpe",  # Llama 3
    _LETTERS_DIGITS + _REST: "qwen2",
}
PAD_SCORE = -1000.0  # score of the filler tokens between the tokenizer's vocabulary and the model's


def check_options(fmt: str, quant: str | None, dtype: str | None) -> None:
    """Refuse --quant outside gguf, --dtype with gguf, and an unknown --quant (before loading anything)."""
    if fmt != "gguf":
        if quant:
            raise UserError(f"--quant applies to --format gguf only (got --format {fmt}): use --dtype for {fmt}")
        return
    if dtype:
        raise UserError("--dtype does not apply to --format gguf: choose the weights' type with --quant")
    if quant and quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)}; got {quant!r}")


def write(loaded: LoadedModel, out: Path, quant: str = "f16") -> Path:
    """Write `loaded` (without adapters) as the GGUF file `out`: whole or not at all."""
    import gguf

    if storage.is_url(out):
        raise UserError(f"--format gguf writes a local file, not {out}: export here, then copy it")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new --out file")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a directory: create it first")
    cfg = loaded.model_cfg
    arch = _architecture(cfg, max(loaded.seq_len, cfg.max_seq_len))
    files = loaded.tokenizer_files
    if files is None:
        raise UserError(f"{loaded.home} has no tokenizer, which a GGUF file must carry: export a model that has one")
    tokenizer = files.open()
    temp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")  # beside out: the rename is atomic
    writer = gguf.GGUFWriter(temp, arch, use_temp_file=True)  # tensors spool to disk, not to memory
    try:
        _write_metadata(writer, loaded, arch, quant)
        _write_tokenizer(writer, files, tokenizer, cfg.vocab_size, _chat_template(loaded, tokenizer))
        _write_tensors(writer, loaded, arch, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp, out)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
    return out


def _architecture(cfg: ModelConfig, context: int) -> str:
    """llama.cpp's architecture for cfg; refuses what its architecture would compute differently."""
    if cfg.architecture not in ARCHITECTURES:
        raise UserError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {cfg.architecture}")
    # llama.cpp's `llama` attends to the whole context (convert_hf_to_gguf drops Mistral's window): the same
    # model only when the window covers every position.
    if cfg.sliding_window and cfg.sliding_window < context:
        raise UserError(
            f"llama.cpp's llama architecture has no sliding window ({cfg.sliding_window} < context {context}): "
            "GGUF export needs model.sliding_window=0 or at least the context length"
        )
    if cfg.rope_type == "yarn" and (cfg.rope_attention_factor or not cfg.rope_truncate):
        raise UserError(
            "llama.cpp's yarn RoPE has its own attention factor and rounding: GGUF export needs "
            "model.rope_attention_factor=0 and model.rope_truncate=true"
        )
    return ARCHITECTURES[cfg.architecture]


def _chat_template(loaded: LoadedModel, tokenizer: AnyTokenizer) -> str | None:
    """The template the model chats with: a finetuned run's recorded one, else its tokenizer's."""
    return taskinfo.chat_template(taskinfo.read(loaded.home), tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------


def _write_metadata(writer, loaded: LoadedModel, arch: str, quant: str) -> None:
    import gguf

    cfg = loaded.model_cfg
    writer.add_name(Path(str(loaded.home)).name or "bigmodel")
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(max(loaded.seq_len, cfg.max_seq_len))
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    if cfg.dims_per_head * cfg.n_heads != cfg.d_model:  # llama.cpp assumes d_model / heads otherwise
        writer.add_key_length(cfg.dims_per_head)
        writer.add_value_length(cfg.dims_per_head)
    writer.add_rope_dimension_count(cfg.dims_per_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_type in ("linear", "yarn"):
        kind = gguf.RopeScalingType.LINEAR if cfg.rope_type == "linear" else gguf.RopeScalingType.YARN
        writer.add_rope_scaling_type(kind)
        writer.add_rope_scaling_factor(cfg.rope_factor)
    if cfg.rope_type == "yarn":
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_positions)
        writer.add_rope_scaling_yarn_beta_fast(cfg.rope_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(cfg.rope_beta_slow)
    file_types = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def _write_tokenizer(
    writer, files: TokenizerFiles, tokenizer: AnyTokenizer, n_vocab: int, chat_template: str | None
) -> None:
    """The vocabulary (padded to the model's rows, as llama.cpp requires), special ids, flags and template."""
    spec = None if isinstance(tokenizer, Tokenizer) else json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
    sentencepiece = next((f for f in files.companions if f.name.endswith(".model")), None)
    if spec is None:
        tokens, scores, types = _sentencepiece_vocab(tokenizer.path, writer)
    elif _is_byte_level(spec):
        tokens, scores, types = _byte_level_vocab(tokenizer, spec, writer)
    elif sentencepiece is not None:  # a tokenizer.json restating a SentencePiece model (Llama 2, Mistral)
        tokens, scores, types = _sentencepiece_vocab(sentencepiece, writer)
    else:
        raise UserError(
            f"{tokenizer.path}: GGUF export supports SentencePiece and byte-level BPE tokenizers, not this one"
        )
    if len(tokens) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the model only {n_vocab} embedding rows")
    unused = 5  # gguf.TokenType.UNUSED
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(PAD_SCORE)
        types.append(unused)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for kind, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if token_id >= 0:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if chat_template:
        writer.add_chat_template(exported_template(chat_template))  # llama.cpp reads its EOS text as the token
        eos = generation_eos(tokenizer, chat_template)
        if isinstance(eos, list):  # a turn ends with a token of its own (ChatML's <|im_end|>)
            writer.add_eot_token_id(eos[-1])


def _sentencepiece_vocab(model_file: Path, writer) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece pieces with their scores and types (sentencepiece's type numbers are gguf's TokenType)."""
    model = read_sentencepiece(storage.path(model_file).read_bytes())
    if model.normalizer not in ("", "identity"):
        warn(f"llama.cpp does not apply the tokenizer's {model.normalizer} normaliser: rare characters may differ")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_add_space_prefix(model.add_dummy_prefix)
    unk = next((i for i, (_, _, kind) in enumerate(model.pieces) if kind == UNKNOWN), -1)
    if unk >= 0:
        writer.add_unk_token_id(unk)
    return [p for p, _, _ in model.pieces], [s for _, s, _ in model.pieces], [t for _, _, t in model.pieces]


def _is_byte_level(spec: dict) -> bool:
    """A tokenizer.json of byte-level BPE (GPT-2, Llama 3, Qwen): llama.cpp's "gpt2" tokenizer."""
    return (spec.get("model") or {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def _byte_level_vocab(tokenizer, spec: dict, writer) -> tuple[list[str], list[float], list[int]]:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" model: tokens, merges and the pre-tokenizer."""
    model = spec["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, tokenizer.path))
    vocab = tokenizer.tk.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(tokenizer.vocab_size)]
    types = [5] * tokenizer.vocab_size  # UNUSED until a token claims the id
    for token, i in vocab.items():
        tokens[i], types[i] = token, 1  # NORMAL
    for i, added in tokenizer.tk.get_added_tokens_decoder().items():
        types[i] = 3 if added.special else 4  # CONTROL, USER_DEFINED: matched whole in text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_token_merges(merges)
    return tokens, [0.0] * len(tokens), types


def _pre_tokenizer(spec: dict, where: Path) -> str:
    """llama.cpp's name for the tokenizer.json's pre-tokenizer, known by its split regex."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    pattern = splits[0] if len(splits) == 1 else None
    if len(splits) > 1 or (pattern is None and not (byte_level and byte_level[0].get("use_regex", True))):
        pattern = "?"  # no regex llama.cpp knows
    if any(s.get("add_prefix_space") for s in byte_level):  # llama.cpp's BPE never adds a leading space
        pattern = "?"
    if pattern not in PRE_TOKENIZERS:
        raise UserError(
            f"{where}: llama.cpp has no pre-tokenizer for this split pattern; GGUF export knows GPT-2's, "
            "Llama 3's and Qwen2's"
        )
    return PRE_TOKENIZERS[pattern]


# ----------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------


def _write_tensors(writer, loaded: LoadedModel, arch: str, quant: str) -> None:
    """Every parameter under llama.cpp's name and layout ([out, in] rows, as torch stores them)."""
    import gguf

    cfg = loaded.model_cfg
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], cfg.n_layers)
    head = "output" if not cfg.tie_embeddings else "token_embd"  # the matrix that produces the logits
    fell_back: list[str] = []
    for ours, value in layout.named(loaded.params).items():  # per-layer names in either layout
        hf = hf_name(ours)
        base, _, suffix = hf.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise UserError(f"parameter {ours} has no llama.cpp tensor for architecture {arch}")
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        if ours == "lm_head" or ours.endswith("_proj"):
            array = array.T  # ours [in, out] -> [out, in]
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = cfg.n_heads if base.endswith("q_proj") else cfg.kv_heads
            array = _interleave_rotary_rows(array, heads)
        tensor_type = quant if name != head or quant != "q4_0" else "q8_0"
        data, qtype = _encode(np.ascontiguousarray(array), tensor_type, gguf)
        if array.ndim == 2 and tensor_type in ("q8_0", "q4_0") and qtype == gguf.GGMLQuantizationType.F16:
            fell_back.append(name)
        writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=qtype)
    if cfg.rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_divisors(cfg), raw_dtype=gguf.GGMLQuantizationType.F32)
    if fell_back:
        warn(f"{len(fell_back)} tensors ({fell_back[0]}...) have rows that do not divide into blocks: written as f16")


def _interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows [out, in] of q or k reordered within each head from halves (i, i + E/2) to pairs (2i, 2i + 1)."""
    out, width = weight.shape
    head_dim = out // heads
    return weight.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(out, width)


def _encode(array: np.ndarray, quant: str, gguf) -> tuple[np.ndarray, object]:
    """(data, GGML type) of one tensor: 1-D in F32; 2-D in the quant type where its rows fit the blocks."""
    types = gguf.GGMLQuantizationType
    if array.ndim < 2:
        return array.astype(np.float32), types.F32
    qtype = {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[quant]
    if qtype == types.F16:
        return array.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), types.F16
    return gguf.quants.quantize(array, qtype), qtype


def _llama3_rope_divisors(cfg: ModelConfig) -> np.ndarray:
    """Llama 3's RoPE as llama.cpp applies it: each base frequency divided by a factor, stored per frequency."""
    half = cfg.dims_per_head // 2
    base = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) * 2 / cfg.dims_per_head)
    original, factor = cfg.rope_original_max_positions, cfg.rope_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    divisors = np.ones(half)
    for i, freq in enumerate(base):
        wavelength = 2 * math.pi / freq
        if wavelength > original / low:  # long wavelengths: stretched by the whole factor
            divisors[i] = factor
        elif wavelength >= original / high:  # the band between blends the two
            smooth = (original / wavelength - low) / (high - low)
            divisors[i] = 1 / ((1 - smooth) / factor + smooth)
    return divisors.astype(np.float32)
