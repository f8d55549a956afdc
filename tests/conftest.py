"""Test setup: 8 fake CPU devices, a shared compilation cache, and helpers that run the real CLI."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Must happen before jax is imported anywhere: the suite runs data/fsdp/tensor meshes on one CPU.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("BIGMODEL_CACHE_DIR", str(Path(tempfile.gettempdir()) / "bigmodel-test-jax-cache"))

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BIGMODEL_SHARED_DATA", REPO.parent / "shared" / "data"))


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
