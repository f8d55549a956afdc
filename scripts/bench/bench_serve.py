#!/usr/bin/env python3
"""`bigmodel serve` under load: N concurrent clients sending M streamed requests each, once per --max-batch.

    python scripts/bench/bench_serve.py runs/tiny --clients 8 --requests 4 --max-tokens 64 --max-batch 1 8
For each max-batch value the script starts its own server (`bigmodel serve MODEL --port 0`), warms it up with
each prompt once (so compilation is not timed), then has every client send its requests one after another
through the official openai client, streamed, greedy. It reports total completion tokens/s over the wall time,
p50/p99 time to first token and request latency, and errors; and the tokens/s ratio of the last setting over
the first. --json prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the", "and", "of", "to", "in", "it", "is", "was", "he", "for", "on", "that")


def start_server(model: str, max_batch: int, max_model_len: int, log: Path) -> tuple[subprocess.Popen, str]:
    """A `bigmodel serve` process on a free port, and its base URL once it answers."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "bigmodel_cli", "serve", model, "--port", "0", "--max-batch", str(max_batch)]
    command += ["--max-model-len", str(max_model_len)] if max_model_len else []
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=out, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bigmodel serve exited with {proc.returncode}:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            if line.startswith("serving ") and " at http://" in line:
                return proc, line.split(" at ")[1].split()[0]
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"bigmodel serve did not start in 10 minutes:\n{log.read_text()}")


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: time to first token, latency and completion tokens (or the error)."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    latency = time.perf_counter() - start
    return {"ttft": first if first is not None else latency, "latency": latency, "tokens": tokens}


def measure(args, max_batch: int, workdir: Path) -> dict:
    proc, base = start_server(args.model, max_batch, args.max_model_len, workdir / f"serve-{max_batch}.log")
    try:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
        prompts = [f"{WORDS[i % len(WORDS)]} " for i in range(args.clients)]
        for prompt in sorted(set(prompts)):  # compile every prompt bucket before timing
            one_request(client, args.model, prompt, 2)
        results: list[dict] = []
        lock = threading.Lock()

        def client_loop(prompt: str) -> None:
            for _ in range(args.requests):
                result = one_request(client, args.model, prompt, args.max_tokens)
                with lock:
                    results.append(result)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client_loop, prompts))
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = np.array([r["ttft"] for r in done]) if done else np.zeros(1)
    latency = np.array([r["latency"] for r in done]) if done else np.zeros(1)
    tokens = sum(r["tokens"] for r in done)
    return {
        "max_batch": max_batch,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * float(np.percentile(ttft, 50)), 1),
        "ttft_p99_ms": round(1000 * float(np.percentile(ttft, 99)), 1),
        "latency_p50_ms": round(1000 * float(np.percentile(latency, 50)), 1),
        "latency_p99_ms": round(1000 * float(np.percentile(latency, 99)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="any model source bigmodel serve takes (a run directory, an export, hf:...)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens asked for per request")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="server settings to compare")
    parser.add_argument("--max-model-len", type=int, default=0, help="passed to bigmodel serve; 0 = the model's")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args, batch, Path(tmp)) for batch in args.max_batch]
    summary = {
        "model": args.model,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "runs": rows,
        "speedup": round(rows[-1]["tokens_per_s"] / max(rows[0]["tokens_per_s"], 1e-9), 2),
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{args.clients} clients x {args.requests} requests, {args.max_tokens} tokens each, greedy, streamed")
    print("max-batch  tokens/s  TTFT p50/p99 ms     latency p50/p99 ms   errors")
    for r in rows:
        print(
            f"{r['max_batch']:>9}  {r['tokens_per_s']:>8}  {r['ttft_p50_ms']:>7} / {r['ttft_p99_ms']:<9}"
            f"{r['latency_p50_ms']:>8} / {r['latency_p99_ms']:<9}  {r['errors']}"
        )
        if r["first_error"]:
            print(f"           first error: {r['first_error']}")
    print(f"total tokens/s, max-batch {rows[-1]['max_batch']} over {rows[0]['max_batch']}: {summary['speedup']}x")


if __name__ == "__main__":
    main()
