#!/usr/bin/env python3
"""`bigmodel preprocess` on a >= 100 MB corpus against raw SentencePiece batch encoding of the same text.

It writes the corpus (copies of ../shared/data/pretrain/tinyshakespeare.txt, spread over --files files) into
a temporary directory, then per round:
  A  python -m bigmodel_cli --quiet preprocess CORPUS --out A --model-type bpe --vocab-size 8000
     (the whole job: sampling pass, tokenizer training, encoding pass, shards, manifest);
  B  the same with --tokenizer A/tokenizer.model (the encoding pass alone);
  R  raw: SentencePieceProcessor(A/tokenizer.model).encode(pieces, num_threads=os.cpu_count()) over the
     same text in the same 64K-character pieces, timing only the encode calls.
Tokens/s = tokens / wall seconds; also CPU seconds per token (user + system, of the CLI and all its processes,
and of the raw encode calls), which a shared machine's other load disturbs much less than wall time. Peak RSS is
the largest sum of RSS over the preprocess process and its worker processes (sampled every 50 ms), next to
getrusage(RUSAGE_CHILDREN).ru_maxrss (the largest single one).
The goal: B (and A) at >= 80% of R's tokens/s, and peak RSS far below the corpus size.

Usage:
  python scripts/bench/bench_preprocess.py [--mb 100] [--files 10] [--rounds 1] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
sys.path.insert(0, str(REPO))


def make_corpus(root: Path, mb: int, files: int, source: Path) -> int:
    """Copies of the source text over `files` files, at least `mb` MB in all; returns the bytes written."""
    text = source.read_bytes()
    copies = -(-mb * 1_000_000 // (len(text) * files))
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"part-{i:03d}.txt").write_bytes(text * copies)
    return len(text) * copies * files


def tree_usage(pid: int, cpu: dict[int, float]) -> int:
    """RSS in bytes of a process and all its descendants (0 once it is gone); records each one's CPU seconds
    (user + system) so far into cpu. The workers are children of multiprocessing's forkserver, which nobody
    waits for, so getrusage(RUSAGE_CHILDREN) would miss their CPU time: it is sampled here instead."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            times = p.cpu_times()
            cpu[p.pid] = max(cpu.get(p.pid, 0.0), times.user + times.system)
        except psutil.Error:
            pass
    return total


def run_preprocess(args: list[str]) -> dict:
    """Run the CLI, sampling the RSS of its process tree; returns wall seconds and peak RSS."""
    cmd = [sys.executable, "-m", "bigmodel_cli", "--quiet", "preprocess", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, cpu = [0], {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_usage(proc.pid, cpu))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed ({proc.returncode}):\n{out}\n{err}")
    # CPU seconds of the process tree, sampled every 50 ms (the last <= 50 ms of each process is missed).
    return {"cmd": " ".join(cmd[1:]), "wall_s": wall, "cpu_s": sum(cpu.values()), "peak_rss_mb": peak[0] / 2**20}


def raw_encode(corpus: Path, model: Path) -> dict:
    """Raw SentencePiece batch encoding of the corpus in the pipeline's pieces; only encode calls are timed."""
    import sentencepiece as spm

    from bigmodel_cli.data.sources import cut

    sp = spm.SentencePieceProcessor(model_file=str(model))
    threads = os.cpu_count() or 1
    tokens, seconds, cpu = 0, 0.0, 0.0
    for path in sorted(corpus.iterdir()):
        pieces = cut(path.read_text(encoding="utf-8"))
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        ids = sp.encode(pieces, num_threads=threads)
        seconds += time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu += r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        tokens += sum(map(len, ids))
        del ids
    return {
        "tokens": tokens,
        "encode_s": seconds,
        "cpu_s": cpu,
        "tokens_per_s": tokens / seconds,
        "num_threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MB (at least)")
    parser.add_argument("--files", type=int, default=10, help="number of corpus files")
    parser.add_argument("--rounds", type=int, default=1, help="repeat A, B and R this many times (interleaved)")
    parser.add_argument("--source", type=Path, default=SHAKESPEARE, help="text to repeat")
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    opts = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        corpus = tmp / "corpus"
        size = make_corpus(corpus, opts.mb, opts.files, opts.source)
        print(f"corpus: {size / 1e6:.1f} MB in {opts.files} files under {corpus}", flush=True)
        rounds = []
        for r in range(opts.rounds):
            a_dir, b_dir = tmp / f"a{r}", tmp / f"b{r}"
            a = run_preprocess([str(corpus), "--out", str(a_dir), "--model-type", "bpe", "--vocab-size", "8000"])
            manifest = json.loads((a_dir / "manifest.json").read_text())
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            b = run_preprocess([str(corpus), "--out", str(b_dir), "--tokenizer", str(a_dir / "tokenizer.model")])
            raw = raw_encode(corpus, a_dir / "tokenizer.model")
            same = all(
                (a_dir / f["file"]).read_bytes() == (b_dir / f["file"]).read_bytes()
                for s in manifest["splits"].values()
                for f in s["files"]
            )
            for x in (a, b):
                x["tokens_per_s"] = tokens / x["wall_s"]
                x["vs_raw"] = x["tokens_per_s"] / raw["tokens_per_s"]
                x["cpu_vs_raw"] = (raw["cpu_s"] / raw["tokens"]) / (x["cpu_s"] / tokens)  # CPU-s per token ratio
            row = {"tokens": tokens, "full": a, "encode_only": b, "raw": raw, "same_tokens": same}
            rounds.append(row)
            print(
                f"round {r}: {tokens / 1e6:.1f}M tokens | full preprocess {a['wall_s']:.1f}s "
                f"{a['tokens_per_s'] / 1e6:.2f}M tok/s ({a['vs_raw']:.0%} of raw), peak RSS {a['peak_rss_mb']:.0f} MB"
                f" | with --tokenizer {b['wall_s']:.1f}s {b['tokens_per_s'] / 1e6:.2f}M tok/s ({b['vs_raw']:.0%}),"
                f" peak RSS {b['peak_rss_mb']:.0f} MB | raw encode {raw['tokens_per_s'] / 1e6:.2f}M tok/s"
                f" ({raw['num_threads']} threads) | CPU time per token, raw/ours: full {a['cpu_vs_raw']:.0%},"
                f" --tokenizer {b['cpu_vs_raw']:.0%} | same tokens: {same} | load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            shutil.rmtree(a_dir)
            shutil.rmtree(b_dir)
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "corpus_mb": size / 1e6,
            "ru_maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "rounds": rounds,
        }
        print(f"largest single child process RSS (getrusage): {result['ru_maxrss_children_mb']:.0f} MB")
        if opts.json_out:
            opts.json_out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
