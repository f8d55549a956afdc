#!/usr/bin/env python3
"""llama.cpp itself on bigmodel's GGUF exports: greedy agreement with bigmodel's generate, and decode speed.

    pip install llama-cpp-python    # llama.cpp's Python binding; builds llama.cpp from source (~10 min on 2 cores)
    python scripts/verify/gguf_llamacpp.py runs/tiny --prompt "ROMEO:" --max-new-tokens 64

For the model (any bigmodel model source: a run, a checkpoint, an export, hf:DIR) it exports f16 and q8_0 GGUF
files with `bigmodel export --format gguf`, then, on the same prompt ids (the model's own tokenizer, as
`bigmodel generate` encodes a prompt):
- runs llama.cpp's greedy decoding on each file and bigmodel's greedy `generate` (temperature 0) on the model,
  and reports how many of the new tokens agree (the common prefix, out of --max-new-tokens);
- checks that llama.cpp's tokenizer, read from the file, gives the prompt bigmodel's ids (BOS as the file says);
- feeds llama.cpp bigmodel's whole greedy sequence (teacher forcing) and compares its logits with bigmodel's at
  every new position: the share of positions whose argmax agrees, and the largest logit difference relative to
  the logits' standard deviation. A greedy sequence of a weakly trained model runs into near-ties, where a
  quantized model may turn off early and then follow its own text: the per-position figures say whether the
  model is the same;
- measures decode tokens/s of both in this one process, on this CPU: the time from the first new token to the
  last, so prompt processing and (bigmodel's) compilation are left out. Each side runs once to warm up, then
  --repeats times; the median counts. llama.cpp uses --threads threads (default: every core, as XLA does; on a
  host busy with other work, llama.cpp's OpenMP threads wait for each other, and fewer can be faster).
Prints one JSON line, then one markdown row (`--header` prints the table's header first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
HEADER = (
    "| model | prompt + new tokens | greedy prefix agreement f16 / q8_0 | forced argmax agreement f16 / q8_0 "
    "| max logit diff / std f16 / q8_0 | bigmodel tok/s | llama.cpp tok/s f16 / q8_0 | llama.cpp f16 / bigmodel |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a bigmodel model source: run directory, checkpoint, export or hf:DIR")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, help="where the GGUF files go (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    parser.add_argument("--header", action="store_true", help="print the markdown table's header first")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python (it builds llama.cpp from source)")

    from bigmodel_cli import cli_app, export, modelio

    cli_app._setup_jax(inference=True)  # as `bigmodel generate` sets up JAX
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="gguf-llamacpp-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = modelio.load(Path(args.model))
    prompt = loaded.tokenizer("--prompt needs the model's tokenizer").encode_prompt(args.prompt)
    n = args.max_new_tokens
    ours, ours_rate = _bigmodel(loaded, prompt, n, args.repeats)
    result: dict = {
        "model": args.model,
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, avx512f: {_avx512()}",
        "llama_cpp_python": llama_cpp.__version__,
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "llama_cpp_threads": args.threads,
        "bigmodel_tokens_per_s": round(ours_rate, 1),
    }
    sequence = prompt + ours[:-1]  # each new token is predicted from the position before it
    our_logits = _bigmodel_logits(loaded, sequence)[len(prompt) - 1 :]
    for quant in ("f16", "q8_0"):
        path = out_dir / f"model-{quant}.gguf"
        if not path.exists():
            export.run(Path(args.model), path, "gguf", quant=quant)
        theirs, rate = _llama_cpp(llama_cpp, path, prompt, n, args.repeats, args.threads)
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), n)
        their_ids, their_logits = _llama_cpp_logits(llama_cpp, path, sequence, args.prompt)
        their_logits = their_logits[len(prompt) - 1 :]
        result[f"{quant}_prompt_ids_equal"] = their_ids == prompt
        result[f"{quant}_agreement"] = f"{agree}/{n}"
        result[f"{quant}_forced_argmax_agreement"] = round(
            float((their_logits.argmax(-1) == our_logits.argmax(-1)).mean()), 3
        )
        result[f"{quant}_max_logit_diff_over_std"] = round(
            float(np.abs(their_logits - our_logits).max() / our_logits.std()), 4
        )
        result[f"llama_cpp_{quant}_tokens_per_s"] = round(rate, 1)
    result["llama_cpp_f16_over_bigmodel"] = round(result["llama_cpp_f16_tokens_per_s"] / ours_rate, 2)
    print(json.dumps(result))
    if args.header:
        print(HEADER)
    pair = lambda key: f"{result['f16_' + key]} / {result['q8_0_' + key]}"  # noqa: E731
    print(
        f"| {args.model} | {len(prompt)} + {n} | {pair('agreement')} | {pair('forced_argmax_agreement')} "
        f"| {pair('max_logit_diff_over_std')} | {result['bigmodel_tokens_per_s']} "
        f"| {result['llama_cpp_f16_tokens_per_s']} / {result['llama_cpp_q8_0_tokens_per_s']} "
        f"| {result['llama_cpp_f16_over_bigmodel']} |"
    )


def _bigmodel(loaded, prompt: list[int], n: int, repeats: int) -> tuple[list[int], float]:
    """bigmodel's greedy tokens, and decode tokens/s: (n - 1) tokens over the time n tokens take beyond 1."""
    from bigmodel_cli.evaluate.generate import Sampling, generate_ids

    def timed(count: int) -> tuple[list[int], float]:
        start = time.perf_counter()
        ids = generate_ids(loaded, [prompt], Sampling(max_new_tokens=count, temperature=0.0))[0]
        return ids, time.perf_counter() - start

    tokens, _ = timed(n)  # compiles
    timed(1)
    full = statistics.median(timed(n)[1] for _ in range(repeats))
    first = statistics.median(timed(1)[1] for _ in range(repeats))
    return tokens, (n - 1) / (full - first)


def _bigmodel_logits(loaded, sequence: list[int]) -> np.ndarray:
    """bigmodel's f32 logits [T, V] over one sequence."""
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(loaded.graphdef, loaded.params)
    return np.asarray(model(jnp.asarray([sequence], jnp.int32))[0], np.float32)


def _llama_cpp_logits(llama_cpp, path: Path, sequence: list[int], text: str) -> tuple[list[int], np.ndarray]:
    """llama.cpp's ids for text (special tokens read as such, BOS where the file asks for it), and its logits
    [T, V] over one sequence."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(sequence) + 8, logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    llm.eval(sequence)
    logits = np.array(llm.scores[: len(sequence)], np.float32)
    llm.close()
    return ids, logits


def _llama_cpp(llama_cpp, path: Path, prompt: list[int], n: int, repeats: int, threads: int) -> tuple[list[int], float]:
    """llama.cpp's greedy tokens (top_k 1), and decode tokens/s from the first new token to the last."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=threads, seed=0, verbose=False)

    def run() -> tuple[list[int], float]:
        tokens, first_at = [], 0.0
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == 1:
                first_at = time.perf_counter()
            if len(tokens) == n:
                break
        return tokens, (n - 1) / (time.perf_counter() - first_at)

    tokens, _ = run()  # warm-up
    rate = statistics.median(run()[1] for _ in range(repeats))
    llm.close()
    return tokens, rate


def _avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


if __name__ == "__main__":
    main()
