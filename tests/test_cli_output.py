"""What the CLI prints: plain text off a TTY, JSON lines on request, help with examples, report and runs."""

import json
import re

from tests.conftest import REPO, run_cli_subprocess

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TINY = REPO / "recipes" / "tiny.toml"


def test_non_tty_output_has_no_ansi_and_json_mode_is_json_lines(tiny_data, tmp_path):
    args = [
        "pretrain",
        TINY,
        "--run-dir",
        tmp_path / "run",
        "--set",
        f"data.path={tiny_data}",
        "--set",
        "train.steps=4",
        "--set",
        "train.log_every=2",
        "--set",
        "train.eval_every=4",
    ]
    plain = run_cli_subprocess(*args)
    assert not ANSI.search(plain.stdout + plain.stderr)
    assert "step 4/4 | loss" in plain.stdout

    js = run_cli_subprocess("--log-format", "json", *args[:3], tmp_path / "run_json", *args[4:])
    lines = [json.loads(line) for line in js.stdout.strip().splitlines()]  # every line is one JSON object
    steps = [line for line in lines if line.get("event") == "metrics"]
    assert [s["step"] for s in steps] == [2, 4] and "val_loss" in steps[-1]

    quiet = run_cli_subprocess("--quiet", *args[:3], tmp_path / "run_quiet", *args[4:])
    assert "step 2/4" not in quiet.stdout and "run_dir:" in quiet.stdout

    listing = run_cli_subprocess("runs", tmp_path)
    assert "run_json" in listing.stdout and "finished" in listing.stdout

    report = run_cli_subprocess("report", tmp_path / "run", tmp_path / "run_json", "--out", tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000 and "r.png" in report.stdout


def test_help_shows_examples_and_version(cli):
    top = cli("--help").stdout
    for name in ("preprocess", "pretrain", "evaluate", "generate", "export", "plan", "report", "runs"):
        assert name in top
        assert "Example: bigmodel" in cli(name, "--help").stdout
    assert re.match(r"bigmodel \d+\.\d+\.\d+", cli("--version").stdout)
