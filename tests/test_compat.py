"""Run directories and exports written by an earlier bigmodel still load and evaluate to the loss they had then.

tests/golden/compat was made on 2026-11-30 (before the one-owner-per-concept redesign, issue #13) with:
    bigmodel preprocess corpus.txt --out data --model-type char --no-byte-fallback --val-fraction 0.2
    bigmodel pretrain recipes/tiny.toml --run-dir run --set data.path=data --set model.preset= \
        --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=2 --set model.n_kv_heads=1 \
        --set model.d_ff=64 --set model.max_seq_len=32 --set train.steps=3 --set train.batch_size=8 \
        --set checkpoint.every=3 --set checkpoint.keep=1 --set train.eval_every=3
    bigmodel export run --out export; bigmodel export run --out export-hf --format hf
and then `bigmodel evaluate run --data data` printed the loss below (the export printed the same).
"""

import json
import shutil
from pathlib import Path

import pytest

from bigmodel_cli import config as config_lib
from tests.conftest import model_tolerance

GOLDEN = Path(__file__).parent / "golden" / "compat"
LOSS_THEN = 2.812509812806782  # val loss over 1,824 tokens, step 3


@pytest.fixture(scope="module")
def compat(tmp_path_factory) -> Path:
    """A writable copy: reading a run may lock it, and evaluate writes metrics.json beside the model."""
    return Path(shutil.copytree(GOLDEN, tmp_path_factory.mktemp("compat") / "golden"))


@pytest.mark.parametrize("model", ["run", "run/checkpoints/3", "export", "hf:export-hf"])
def test_an_old_run_and_its_exports_evaluate_to_the_same_loss(cli, compat, model):
    path = f"hf:{compat / model[3:]}" if model.startswith("hf:") else compat / model
    metrics = json.loads(cli("evaluate", path, "--data", compat / "data", "--json").stdout.strip().splitlines()[-1])
    info = json.loads((compat / "export" / "config.json").read_text())
    cfg = config_lib.build_config({"model": info["model"]}, {}, config_lib.Config, compat).model
    assert metrics["step"] == (0 if model.startswith("hf:") else 3) and metrics["tokens"] == 1824
    tolerance = model_tolerance(LOSS_THEN, cfg, 32, loss_tokens=1824)  # another host may add in another order
    assert metrics["loss"] == pytest.approx(LOSS_THEN, abs=tolerance)


def test_an_old_run_resumes(cli, compat, tmp_path):
    run = Path(shutil.copytree(compat / "run", tmp_path / "run"))
    text = (run / "config.toml").read_text().replace('path = "/tmp/compatfx/data"', f'path = "{compat / "data"}"')
    (run / "config.toml").write_text(text)
    out = cli("pretrain", run / "config.toml", "--run-dir", run, "--set", "train.steps=4", "--allow-config-change")
    assert "resumed from step 3" in out.stdout + out.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
