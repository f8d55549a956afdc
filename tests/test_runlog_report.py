"""Tests for the run logger (metrics.jsonl, TensorBoard) and the report stage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigmodel_cli import report
from bigmodel_cli.errors import UserError
from bigmodel_cli.runlog import RunLogger


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard would show for the run, by tag."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _fake_run(run_dir: Path, steps: int = 400, scale: float = 1.0) -> Path:
    """A run dir whose metrics.jsonl has a falling loss, warmup+decay lr and noisy throughput."""
    rng = np.random.default_rng(int(scale * 100))
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text('[model]\nname = "tiny"\n')
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1, 5):
            row = {
                "step": step,
                "loss": 2.0 + 8.0 * scale * math.exp(-step / 80) + rng.normal(0, 0.05),
                "lr": 3e-4 * min(1.0, step / 50) * (1 - step / (steps + 1)),
                "grad_norm": 1.0 + rng.random(),
                "tokens_per_s": 50_000 * scale + rng.normal(0, 2_000),
                "mfu": 0.4,
            }
            if step % 50 == 1:
                row["val_loss"] = row["loss"] + 0.1
            f.write(json.dumps(row) + "\n")
    return run_dir


def test_logger_writes_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with RunLogger(tmp_path) as log:
        log.log(1, {"loss": 3.5, "lr": 1e-4, "tokens_per_s": np.float32(1000.0)})
        log.log(2, {"loss": float("nan"), "lr": 2e-4, "val_loss": float("inf")})
        log.log(2, {"eval_hellaswag": 0.25})

    rows = _jsonl(tmp_path / "metrics.jsonl")  # json.loads rejects nothing: every line is valid JSON
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert rows == [
        {"step": 1, "loss": 3.5, "lr": 1e-4, "tokens_per_s": 1000.0},
        {"step": 2, "loss": None, "lr": 2e-4, "val_loss": None},
        {"step": 2, "eval_hellaswag": 0.25},
    ]

    scalars = _scalars(tmp_path)
    assert set(scalars) == {
        "train/loss",
        "train/lr",
        "train/tokens_per_s",
        "train/val_loss",
        "eval/hellaswag",
    }
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/loss"][0][1] == pytest.approx(3.5)
    assert math.isnan(scalars["train/loss"][1][1])
    assert scalars["train/lr"] == [(1, pytest.approx(1e-4)), (2, pytest.approx(2e-4))]
    assert scalars["eval/hellaswag"] == [(2, pytest.approx(0.25))]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, enabled=False) as log:
        log.log(1, {"loss": 1.0})
        log.truncate_after(0)
    assert not run_dir.exists()


def test_missing_wandb_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail even where it is installed
    with pytest.raises(RuntimeError, match="pip install wandb"):
        RunLogger(tmp_path, wandb_project="proj")


def test_truncate_after_drops_steps_of_the_killed_run(tmp_path: Path) -> None:
    with RunLogger(tmp_path) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # torn by the kill

    with RunLogger(tmp_path) as log:  # the resumed run, restored from the step-3 checkpoint
        log.truncate_after(3)
        assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        log.log(4, {"loss": 40.0})
        log.log(5, {"loss": 50.0})

    assert [(r["step"], r["loss"]) for r in _jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]
    assert not list(tmp_path.glob("*.tmp"))
    # TensorBoard hides the killed run's steps 4 and 5 in favour of the resumed run's.
    assert _scalars(tmp_path)["train/loss"] == [
        (s, pytest.approx(v)) for s, v in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    ]


def test_report_png_for_two_runs(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "run-a")
    b = _fake_run(tmp_path / "run-b", scale=0.7)
    (b / "metrics.json").write_text(json.dumps({"loss": 2.1, "perplexity": 8.17}))

    out = report.run([a, b], tmp_path / "out" / "report.png")

    assert out == tmp_path / "out" / "report.png"
    assert out.stat().st_size > 10_000
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert 800 <= im.width <= 3000 and 500 <= im.height <= 3000
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    assert not list(out.parent.glob("*.tmp"))


def test_report_html_embeds_png_and_table(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "run-a")
    b = _fake_run(tmp_path / "run-b", scale=0.7)
    (a / "metrics.json").write_text(json.dumps({"loss": 2.05, "perplexity": 7.77}))

    page = report.run([a, b], tmp_path / "report.html").read_text()

    assert '<img src="data:image/png;base64,' in page
    assert "<table>" in page and "final perplexity" in page and "7.77" in page
    assert "<td>run-a</td>" in page and "<td>run-b</td>" in page


@pytest.mark.parametrize(
    ("setup", "out_name", "match"),
    [
        ("missing", "r.png", "does not exist"),
        ("no_metrics", "r.png", "no metrics.jsonl"),
        ("empty", "r.png", "holds no metrics"),
        ("ok", "r.pdf", "unsupported report format"),
    ],
)
def test_report_user_errors(tmp_path: Path, setup: str, out_name: str, match: str) -> None:
    run_dir = tmp_path / "run"
    if setup == "ok":
        _fake_run(run_dir)
    elif setup != "missing":
        run_dir.mkdir()
        if setup == "empty":
            (run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match=match):
        report.run([run_dir], tmp_path / out_name)
    assert not (tmp_path / out_name).exists()


def test_list_runs(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a")
    b = _fake_run(tmp_path / "sweep" / "b", steps=100)
    (b / "status.json").write_text(json.dumps({"state": "finished", "step": 96}))
    configured = tmp_path / "sweep" / "c"  # training wrote its config, and nothing yet
    configured.mkdir()
    (configured / "config.toml").write_text("")
    (tmp_path / "x" / "y" / "too-deep").mkdir(parents=True)
    (tmp_path / "x" / "y" / "too-deep" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')

    runs = report.list_runs(tmp_path)

    assert [r["path"] for r in runs] == [a, b, configured]
    ra, rb, rc = runs
    assert ra["step"] == 396 and ra["status"] == "unknown"
    last_val = [r["val_loss"] for r in _jsonl(a / "metrics.jsonl") if "val_loss" in r][-1]
    assert ra["val_loss"] == pytest.approx(last_val)
    assert rb["step"] == 96 and rb["status"] == "finished" and rb["loss"] > 2.0
    assert rc == {
        "path": configured,
        "step": 0,
        "loss": None,
        "val_loss": None,
        "total_steps": None,
        "status": "starting",
    }
    with pytest.raises(UserError):
        report.list_runs(tmp_path / "nope")


def test_runs_show_a_run_that_has_just_started_or_restarted(tmp_path: Path) -> None:
    from bigmodel_cli import config as config_lib
    from bigmodel_cli.atomic import write_json
    from bigmodel_cli.train.loop import prepare_run_dir

    run = tmp_path / "run"
    cfg = config_lib.load_config(None, ["train.steps=7"])
    prepare_run_dir(run, cfg, "auto", False)  # what training does first, long before its step is compiled
    (row,) = report.list_runs(tmp_path)
    assert (row["status"], row["step"], row["total_steps"], row["loss"]) == ("starting", 0, 7, None)

    write_json(run / "status.json", {"state": "running", "step": 0})  # the step is compiled
    assert [(r["status"], r["step"]) for r in report.list_runs(tmp_path)] == [("running", 0)]
    with RunLogger(run, tensorboard=False) as log:
        log.log(5, {"loss": 3.0})
    write_json(run / "status.json", {"state": "stopped", "step": 5})
    assert [(r["status"], r["step"]) for r in report.list_runs(tmp_path)] == [("stopped", 5)]

    earlier = time.time() - 60  # the stopped run's files, a minute before it is started again
    for name in ("status.json", "metrics.jsonl"):
        os.utime(run / name, (earlier, earlier))
    prepare_run_dir(run, cfg, "auto", False)
    assert [(r["status"], r["step"], r["loss"]) for r in report.list_runs(tmp_path)] == [("starting", 5, 3.0)]


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch whenever it is installed (the dev extra installs it): 1.3 s and ~200 MB
    that every training process would pay for a type hint."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bigmodel_cli.runlog import RunLogger\n"
        "with RunLogger(Path(sys.argv[1])) as log:\n"
        "    log.log(1, {'loss': 2.0})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
    assert list((tmp_path / "tensorboard").glob("events.*"))
