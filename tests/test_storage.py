"""gs:// directories: without the client installed, every command that takes a directory refuses a gs:// one in
one line that names the extra, before it writes anything, here or anywhere else."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

RECIPE = REPO / "recipes" / "tiny.toml"
URL = "gs://bucket/bigmodel"


@pytest.fixture
def no_gcs_client(monkeypatch, tmp_path):
    """A process as one without `pip install 'bigmodel[gcs]'` sees it, working in an empty directory."""
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs now raises ImportError
    monkeypatch.chdir(tmp_path)
    return tmp_path


COMMANDS = {
    "pretrain --run-dir": ["pretrain", RECIPE, "--run-dir", f"{URL}/runs/a"],
    "pretrain data.path": ["pretrain", RECIPE, "--run-dir", "runs/a", "--set", f"data.path={URL}/data"],
    "preprocess --out": ["preprocess", RECIPE, "--out", f"{URL}/data"],
    "finetune --init-from": ["finetune", "--task", "qa", "--init-from", f"{URL}/runs/a", "--data", "x.json"],
    "finetune --run-dir": ["finetune", "--task", "qa", "--init-from", "r", "--data", "x.json", "--run-dir", URL],
    "evaluate MODEL": ["evaluate", f"{URL}/runs/a"],
    "evaluate --data": ["evaluate", "runs/a", "--data", f"{URL}/data"],
    "evaluate --out": ["evaluate", "runs/a", "--out", f"{URL}/eval"],
    "generate MODEL": ["generate", f"{URL}/runs/a", "--prompt", "hi"],
    "export MODEL": ["export", f"{URL}/runs/a", "--out", "e"],
    "export --out": ["export", "runs/a", "--out", f"{URL}/export"],
    "runs ROOT": ["runs", f"{URL}/runs"],
    "report RUN_DIRS": ["report", f"{URL}/runs/a", "--out", "r.png"],
}


@pytest.mark.parametrize("case", sorted(COMMANDS))
def test_a_gs_directory_without_the_client_is_one_line_and_writes_nothing(cli, no_gcs_client, case):
    result = cli(*COMMANDS[case], ok=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'bigmodel[gcs]'" in lines[0] and URL in lines[0], lines
    assert list(no_gcs_client.iterdir()) == []  # no ./gs:/bucket/..., no run directory, nothing


def test_another_url_scheme_is_refused_in_one_line(cli, no_gcs_client):
    result = cli("pretrain", RECIPE, "--run-dir", "s3://bucket/runs/a", ok=False)
    assert result.exit_code == 2 and "s3:// is not supported" in result.stderr
    assert list(no_gcs_client.iterdir()) == []


# Paths a command reads or writes only on this machine: a recipe (read by tomllib), the quickstart's own folder, a
# tokenizer handed to SentencePiece's trainer. Every other path option may name a gs:// object or directory.
LOCAL_ONLY = {("pretrain", "recipe"), ("finetune", "recipe"), ("quickstart", "out"), ("preprocess", "tokenizer")}


def test_every_path_a_command_takes_keeps_a_gs_url_whole():
    """Typer makes a Path of `gs://bucket/x`, which collapses to the local `gs:/bucket/x`: a path option without
    storage.parse silently looked for a local file (evaluate --text did)."""
    import typing
    from pathlib import Path

    from typer.models import ArgumentInfo, OptionInfo

    from bigmodel_cli import storage
    from bigmodel_cli.cli import app

    parsed, unparsed = set(), set()
    for command in app.registered_commands:
        for name, hint in typing.get_type_hints(command.callback, include_extras=True).items():
            info = next(
                (m for m in getattr(hint, "__metadata__", ()) if isinstance(m, OptionInfo | ArgumentInfo)), None
            )
            kind = typing.get_args(hint)[0] if info is not None else hint
            if Path in (kind, *typing.get_args(kind), *[a for k in typing.get_args(kind) for a in typing.get_args(k)]):
                where = (command.name or command.callback.__name__, name)
                (parsed if getattr(info, "parser", None) is storage.parse else unparsed).add(where)
    assert unparsed == LOCAL_ONLY
    assert {("evaluate", "text"), ("finetune", "data"), ("evaluate", "predictions"), ("report", "run_dirs")} <= parsed
