"""Test setup: 8 fake CPU devices, a shared compilation cache, and helpers that run the real CLI."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bigmodel_cli.host import with_cpu_compile_flags  # imports no jax

# Must happen before jax is imported anywhere: the suite runs data/fsdp/tensor meshes on one CPU, and compiles
# in-process as the CLI does on a CPU-only host.
os.environ["XLA_FLAGS"] = with_cpu_compile_flags(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("BIGMODEL_CACHE_DIR", str(Path(tempfile.gettempdir()) / "bigmodel-test-jax-cache"))
# The same cache for what runs jax without the CLI (scripts/bench/*.py in a subprocess, library calls here), as
# the CLI sets it up (utils.enable_compilation_cache): a warm suite loads their programs instead of compiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["BIGMODEL_CACHE_DIR"])
# Every program, however quick to compile: the suite's processes compile the same small ones again and again
# (warm suite 3 min 44 s - 4 min 13 s against 4 min 48 s - 5 min 20 s with the CLI's 0.5 s threshold).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# gcsfs reads this once, when imported: its zonal/hierarchical-bucket probe hangs against the GCS emulator
# (tests/gcs_emulator.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

pytest_plugins = ["tests.gcs_emulator"]  # the `gcs` fixture: an emulated bucket

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BIGMODEL_SHARED_DATA", REPO.parent / "shared" / "data"))


# The shape of every tiny transformers model the tests build (vocabulary, positions and the rest vary by test).
TINY_HF_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def pytest_xdist_auto_num_workers(config) -> int | None:
    """`-n auto`: one worker per core this process may run on, as many as memory holds (a worker and the CLI
    processes it starts peak near 3 GiB). pytest-xdist's own count comes from psutil, which sees every core of
    the host, not the few a container or taskset allows. PYTEST_XDIST_AUTO_NUM_WORKERS still wins."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:  # a cgroup v2 CPU quota ("200000 100000" is 2 cores' worth)
        quota, period = CGROUP_CPU_MAX.read_text().split()
        cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2, or "max": no quota
        pass
    try:
        memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not Linux: no free-memory figure to cap by
        return max(1, cores)
    return max(1, min(cores, memory // (3 * 2**30)))


def pretrain_args(run_dir, data, settings: dict, *extra, recipe: Path = REPO / "recipes" / "tiny.toml") -> list:
    """`pretrain RECIPE --run-dir RUN_DIR --set data.path=DATA --set KEY=VALUE... EXTRA...` as CLI arguments."""
    args = ["pretrain", recipe, "--run-dir", run_dir, "--set", f"data.path={data}"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


def synthetic_text(n_lines: int = 3000, seed: int = 0) -> str:
    """A small learnable corpus (the quickstart's generator)."""
    from bigmodel_cli.quickstart import corpus

    return corpus(n_lines, seed)


@pytest.fixture(scope="session")
def cli():
    """Run `bigmodel ARGS...` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from bigmodel_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        if ok and result.exit_code != 0:
            raise AssertionError(f"bigmodel {' '.join(map(str, args))} failed:\n{result.output}\n{result.stderr}")
        return result

    return invoke


def run_cli_subprocess(*args, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    """The CLI as a separate OS process (for signals and exit codes)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "bigmodel_cli", *map(str, args)], capture_output=True, text=True, env=full_env, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"bigmodel {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, cli) -> Path:
    """A preprocessed character-level corpus, made once per session."""
    root = tmp_path_factory.mktemp("tiny_data")
    (root / "corpus.txt").write_text(synthetic_text(), encoding="utf-8")
    cli("preprocess", root / "corpus.txt", "--out", root / "data", "--model-type", "char")
    return root / "data"


# ----------------------------------------------------------------------------------------------------------
# Tolerances between differently compiled f32 computations
# ----------------------------------------------------------------------------------------------------------
# Two compilations of the same f32 math (another host's vector width, XLA with and without optimisations,
# another mesh, torch against jax) add in different orders, fuse differently and round at different points.
# How far apart may they be?
# - A length-K f32 sum rounds at every addition, each time by at most u = eps/2 relative. The worst case is
#   K*u, but with terms of mixed sign the rounding errors behave like independent random signs and grow
#   like sqrt(K)*u times the size of the partial sums (Higham, "Accuracy and Stability of Numerical
#   Algorithms", 2nd ed., sections 2.8 and 4.2). Two programs each carry such an error: they differ by up to
#   2*u*sqrt(K) = eps*sqrt(K), relative.
# - A result reached through n reductions one after another (a norm, a matmul, a softmax sum, a matmul...)
#   carries the error of each: n times that, using the longest reduction for all of them.
# - Relative to what? Normalisation keeps the error of each stage relative to that stage's scale, and the
#   last stage's scale is the size of the result: max|reference|. Not each element's own size: an element
#   that cancels to near zero keeps the absolute error of its terms, which is why a per-element rtol
#   (the old 1e-5) fails by chance on a few elements out of thousands.
# So atol = eps * sqrt(K_max) * n * max|reference|, with rtol = 0. On the tests' small models that is 5 to
# 1000 times the differences observed between hosts and compilations, and still below what the bugs those
# tests guard against do (a norm epsilon of 1e-6 for 1e-5: 5 times; a wrong RoPE base, a missing layer, a
# non-causal mask: thousands of times). Each use states its numbers.

import numpy as np  # noqa: E402

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23: the gap between 1.0 and the next f32


def f32_tolerance(reference, *reductions: int, chained: int = 1) -> float:
    """The atol for `reference` against the same f32 math compiled differently: eps*sqrt(K)*chained*max|ref|."""
    return F32_EPS * float(np.sqrt(max(reductions))) * chained * float(np.max(np.abs(np.asarray(reference))))


def model_tolerance(reference, cfg, seq_len: int, loss_tokens: int = 0) -> float:
    """f32_tolerance of a Transformer's logits over seq_len positions, or of its loss over loss_tokens tokens."""
    # Each layer chains 9 reductions: input norm (D), q/k/v (D), q.k (E), softmax sum (T), p.v (T), output
    # projection (H*E), second norm (D), gate/up (D), down (F); then the final norm (D) and the head (D).
    reductions = [cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.dims_per_head, seq_len]
    chained = 9 * cfg.n_layers + 2
    if loss_tokens:  # then the log-sum-exp over the vocabulary and the sum over the counted tokens
        reductions += [cfg.vocab_size, loss_tokens]
        chained += 2
    return f32_tolerance(reference, *reductions, chained=chained)
