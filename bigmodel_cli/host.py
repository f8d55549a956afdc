"""What the process sets up for its host before JAX starts: glibc's malloc tunables and XLA's flags.

Both are read once, when the process (malloc) or JAX's CPU backend (XLA_FLAGS) starts, so the CLI applies them
first thing; a user's own setting of either wins. This module imports no JAX."""

from __future__ import annotations

import os
import sys

# XLA:CPU allocates its scratch buffers afresh every step and glibc serves them from new mmap pages: about
# a million page faults per step on the 35M config. Keeping freed memory in the heap removes them (it must
# be set before the process starts, hence the CLI's re-exec). Accelerator hosts keep glibc's defaults.
CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1"

# Commands that run no step: they only compile (plan) or read files (report, runs). Under the tunables above
# XLA:CPU's compile threads share one malloc arena and wait on it: plan of the scanned 1b preset took 3.2-3.8 s
# of XLA compile against 2.4-2.7 s under glibc's defaults (docs/benchmarks.md). They skip the re-exec.
STEPLESS_COMMANDS = frozenset({"plan", "report", "runs"})

# LLVM at -O3, XLA:CPU's default, spends about a third more time on a step's kernels than at -O2 and makes them
# no faster: the matmuls are library calls, and -O2 vectorizes the rest as well (docs/benchmarks.md, "Compile
# time: scan over layers"). Accelerator hosts keep XLA's default, which their own backends read too.
CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=2"

# XLA:CPU schedules for parallelism by default, which converts every bfloat16 weight to float32 before the first
# layer runs: a float32 copy of the whole model (2x its bfloat16 bytes) on top of it. Inference, often on bf16
# weights from the Hub, schedules for memory instead: each copy then lives only while its layer runs (decoding
# measured as fast).
MEMORY_SCHEDULING = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def cpu_only_host() -> bool:
    """A Linux host with no GPU or TPU device, or one told to run JAX on its CPU."""
    accelerators = ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return (platforms == "cpu" or not any(os.path.exists(p) for p in accelerators)) and sys.platform == "linux"


def wants_malloc_tunables(argv: list[str]) -> bool:
    """Whether `bigmodel ARGV` should run under CPU_MALLOC_TUNABLES: on a CPU-only host, a command that runs steps."""
    return cpu_only_host() and command_name(argv) not in STEPLESS_COMMANDS


def command_name(argv: list[str]) -> str:
    """The subcommand of `bigmodel [GLOBAL OPTIONS] COMMAND ...` ("" when there is none)."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-format":  # the one global option that takes a value
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return ""


def cli_xla_flags(flags: str, inference: bool = False) -> str:
    """XLA_FLAGS as the CLI runs with them on this host: LLVM at -O2 on a CPU-only host, and memory scheduling for
    the inference commands. Benchmarks that call the library directly use it to compile as the CLI does."""
    flags = with_cpu_compile_flags(flags) if cpu_only_host() else flags
    return with_memory_scheduling(flags) if inference else flags


def with_cpu_compile_flags(flags: str) -> str:
    """XLA_FLAGS with CPU_COMPILE_FLAGS added, unless they set LLVM's optimization level themselves."""
    return _with_flag(flags, CPU_COMPILE_FLAGS, unless="xla_backend_optimization_level")


def with_memory_scheduling(flags: str) -> str:
    """XLA_FLAGS with MEMORY_SCHEDULING added, unless they choose XLA:CPU's scheduler themselves."""
    return _with_flag(flags, MEMORY_SCHEDULING, unless="concurrency_optimized_scheduler")


def _with_flag(flags: str, flag: str, unless: str) -> str:
    return flags if unless in flags else f"{flags} {flag}".strip()
