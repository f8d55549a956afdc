"""Small shared helpers: device peak FLOP/s and memory, what CPU this host has, the compilation cache."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bigmodel_cli import atomic, storage

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, matched on jax's device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}
# Model-FLOPs utilisation we measured per chip (PEAK_FLOPS row: (MFU, where it was measured)): the default of
# `plan --tokens`, from the 1b preset's defaults (bf16, scanned layers, no remat, B8 T2048) in
# scripts/bench/gpu_bench.py; chips without a row assume DEFAULT_MFU.
MEASURED_MFU: dict[str, tuple[float, str]] = {
    "NVIDIA H200": (0.48, "1b preset on one H200, docs/benchmarks.md"),
}
DEFAULT_MFU = 0.40


@functools.cache
def measured_matmul_flops(n: int = 1024, reps: int = 8) -> float:
    """FLOP/s of a square fp32 matmul on the default device: the CPU's practical peak.

    The best of this probe and of every earlier one on the same host kind and jax version, kept next to the
    compilation cache: a probe that runs while the data loader's threads or another process hold a core
    measures low (half the peak, seen on 2 cores), and the MFU printed against it would read high."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return _best_peak_so_far(2 * n**3 / best)


def _peak_file() -> Path | None:
    """Where the best CPU probes are kept: beside the compilation cache's directory, when it is a local one."""
    directory = jax.config.jax_compilation_cache_dir
    return None if not directory or storage.is_url(directory) else Path(directory).parent / "cpu_matmul_peak.json"


def _best_peak_so_far(measured: float) -> float:
    path = _peak_file()
    if path is None:
        return measured
    key = f"{host_line()} | jax {jax.__version__}"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        recorded = float(known.get(key, 0.0))
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable or not ours: start it again
        known, recorded = {}, 0.0
    best = max(measured, recorded)
    if best > recorded:
        try:
            atomic.write_text(path, json.dumps({**known, key: best}, indent=1))
        except OSError:
            pass  # a read-only cache directory: this process's probe serves
    return best


def device_peak_flops(dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of one device: the table for accelerators, a measurement on CPU."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_flops()
    row = peak_row(device.device_kind)
    return float("nan") if row is None else chip_peak_flops(row, dtype)


def peak_row(device_kind: str) -> str | None:
    """The PEAK_FLOPS row a jax device_kind belongs to (the longest row name it starts with), or None."""
    rows = [name for name in PEAK_FLOPS if device_kind.lower().startswith(name.lower())]
    return max(rows, key=len, default=None)


def chip_peak_flops(row: str, dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of one chip of a PEAK_FLOPS row for matmuls in dtype."""
    # fp32 matmuls run at roughly half the bf16 rate on TPUs (and through TF32 on GPUs)
    return PEAK_FLOPS[row] * (1.0 if dtype == "bfloat16" else 0.5)


def describe_host(cpuinfo: str | None = None) -> dict:
    """The CPU that benchmark figures depend on: model name, x86 family and model, usable cores, widest x86
    vector ISA, key flags. A virtual machine may name its CPU only "AMD EPYC": the family tells Zen 4 (25)
    from Zen 5 (26), which run the same AVX-512 code at very different speeds."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    lines = cpuinfo.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last core's, same as the first's
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine() or "unknown"
    return {
        "cpu_model": fields.get("model name", platform.processor() or "unknown CPU"),
        "cpu_family": f"family {fields['cpu family']}, model {fields.get('model', '?')}"
        if "cpu family" in fields
        else "",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": isa,
        "cpu_flags": ",".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags),
    }


def host_line(host: dict | None = None) -> str:
    """describe_host() in one line for a benchmark's table: 'AMD EPYC (family 26, model 2), AVX-512, 2 cores'."""
    host = host or describe_host()
    return f"{host['cpu_model']}{_family(host)}, {host['isa']}, {host['cores']} cores"


def host_kind(host: dict) -> str:
    """The host kind a speed ratio belongs to: 'AVX-512 (family 26, model 2), 2 cores'."""
    return f"{host['isa']}{_family(host)}, {host['cores']} cores"


def _family(host: dict) -> str:
    return f" ({host['cpu_family']})" if host.get("cpu_family") else ""


def host_memory_bytes() -> int:
    """Physical RAM, or less when a container's memory limit (cgroup v2 or v1) says so."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 writes a huge number instead, which min() drops
            limits.append(int(text))
    return min(limits)


def device_memory() -> tuple[int, str] | None:
    """(bytes one local device may use, what sets that limit), or None when the backend does not say.

    CPU devices (also the fake ones of --xla_force_host_platform_device_count) share the host's RAM.
    """
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        ram, n = host_memory_bytes(), jax.local_device_count()
        shared = f" shared by {n} CPU devices" if n > 1 else ""
        return ram // n, f"a device has {ram / n / 2**30:.2f} GiB ({ram / 2**30:.1f} GiB of host RAM{shared})"
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if not limit:
        return None
    return int(limit), f"a device has {limit / 2**30:.2f} GiB ({device.device_kind})"


def enable_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache (BIGMODEL_CACHE_DIR, default ~/.cache/bigmodel/jax)."""
    directory = os.environ.get("BIGMODEL_CACHE_DIR") or str(Path.home() / ".cache" / "bigmodel" / "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    # A program that compiles in under half a second gains nothing a user would notice from a cache file (a
    # second `evaluate` of a tiny run: 2.2-2.7 s either way). A user's own threshold wins: the test suite caches
    # every program, because its hundreds of processes compile the same small ones (docs/benchmarks.md).
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
