#!/usr/bin/env python3
"""Where a command's peak memory goes, by glibc's own account of its heap.

Runs one `bigmodel` command in this process, under the malloc tunables and XLA flags the CLI sets on a CPU-only
host, while a thread samples glibc's `mallinfo2()` and /proc/self/statm every --every milliseconds:
    python scripts/bench/heap_account.py -- pretrain recipes/shakespeare_char.toml --run-dir /tmp/h \\
        --set data.path=DATA --set train.eval_every=0 --set train.steps=150
Prints one JSON line: the peak RSS and, at that moment, the heap's size (bytes malloc took from the system), its
bytes in use and free, and the RSS outside the heap; and over the whole run the largest heap and the largest
number of bytes in use at once (a sample can miss a peak shorter than --every).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bigmodel_cli import host  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _sample(mallinfo2, page: int) -> dict:
    info = mallinfo2()
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * page
    heap = info.arena + info.hblkhd  # the main heap and any mmapped chunks
    return {"rss": rss, "heap": heap, "in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=5.0, help="milliseconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the bigmodel command and its arguments")
    opts = parser.parse_args()
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        parser.error("give the bigmodel command after --")
    if os.environ.get("GLIBC_TUNABLES") != host.CPU_MALLOC_TUNABLES:  # malloc reads them at process start
        env = {**os.environ, "GLIBC_TUNABLES": host.CPU_MALLOC_TUNABLES}
        env["XLA_FLAGS"] = host.with_cpu_compile_flags(os.environ.get("XLA_FLAGS", ""))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    page = os.sysconf("SC_PAGE_SIZE")
    samples, done = [], threading.Event()

    def sampler():
        while not done.is_set():
            samples.append(_sample(mallinfo2, page))
            time.sleep(opts.every / 1000)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    from bigmodel_cli import cli

    try:
        cli.app(command, prog_name="bigmodel", standalone_mode=False)
    finally:
        done.set()
        thread.join()
    peak = max(samples, key=lambda s: s["rss"])
    mb = 1e6
    print(
        json.dumps(
            {
                "command": host.command_name(command),
                "samples": len(samples),
                "peak_rss_mb": round(peak["rss"] / mb),
                "at_peak": {
                    "heap_mb": round(peak["heap"] / mb),
                    "in_use_mb": round(peak["in_use"] / mb),
                    "free_mb": round(peak["free"] / mb),
                    "outside_heap_mb": round((peak["rss"] - peak["heap"]) / mb),
                },
                "largest_heap_mb": round(max(s["heap"] for s in samples) / mb),
                "most_in_use_mb": round(max(s["in_use"] for s in samples) / mb),
            }
        )
    )


if __name__ == "__main__":
    main()
