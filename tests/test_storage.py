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
