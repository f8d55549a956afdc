"""The real CLI end to end on a tiny config, 8 fake devices, data-parallel mesh."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, pretrain_args, run_cli_subprocess

TINY = REPO / "recipes" / "tiny.toml"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_evaluate_export_generate(cli, tiny_data, tmp_path):
    run = tmp_path / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 60, "train.eval_every": 30, "checkpoint.every": 30}))
    rows = _metrics(run)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[0])
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    entropy = json.loads((tiny_data / "manifest.json").read_text())["unigram_entropy"]
    assert len(vals) == 2 and vals[-1] < vals[0] and vals[-1] < 0.8 * entropy  # it learns
    config_text = (run / "config.toml").read_text()
    assert "vocab_size = " in config_text and "steps = 60" in config_text
    assert (run / "tokenizer.model").is_file() and (run / "checkpoints" / "60").is_dir()

    result = cli("evaluate", run, "--json")
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert json.loads((run / "metrics.json").read_text())["loss"] == metrics["loss"]

    cli("export", run, "--out", tmp_path / "export")
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.model"}
    exported = json.loads(cli("evaluate", tmp_path / "export", "--json").stdout.strip().splitlines()[-1])
    assert exported["loss"] == pytest.approx(metrics["loss"], abs=1e-6)

    again = cli("export", run, "--out", tmp_path / "export", ok=False)
    assert again.exit_code != 0 and "not empty" in again.stderr

    texts = [
        cli(
            "generate",
            tmp_path / "export",
            "--prompt",
            "two plus",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.9",
            "--seed",
            "3",
        ).stdout
        for _ in range(2)
    ]
    assert texts[0] == texts[1] and texts[0].startswith("two plus") and len(texts[0].strip()) > len("two plus")
    greedy = cli("generate", run, "--prompt", "two plus", "--max-new-tokens", "12", "--temperature", "0").stdout
    assert greedy.startswith("two plus")


def _pretrain_args(run_dir, data, steps=40):
    settings = {"train.steps": steps, "checkpoint.every": 10, "train.log_every": 10, "checkpoint.async_save": "false"}
    return pretrain_args(run_dir, data, settings)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tiny_data, tmp_path, cli):
    full = tmp_path / "full"
    cli(*_pretrain_args(full, tiny_data))  # in this process: only the killed run needs one of its own
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigmodel_cli", *map(str, _pretrain_args(killed, tiny_data))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "20").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = max(r["step"] for r in _metrics(killed))
    assert steps_done < 40, "the run finished before it could be killed"
    out = cli(*_pretrain_args(killed, tiny_data))
    assert "resumed from step" in out.stdout
    final_full, final_resumed = _metrics(full)[-1], _metrics(killed)[-1]
    assert final_resumed["step"] == final_full["step"] == 40
    assert final_resumed["loss"] == final_full["loss"]
    assert final_resumed["val_loss"] == final_full["val_loss"]
    assert [r["step"] for r in _metrics(killed)] == [10, 20, 30, 40]


BAD_RECIPES = {
    "unknown_key": ("[optim]\nlearning_rate = 1e-3\n", "did you mean 'lr'"),
    "unknown_section": ("[optimizer]\nlr = 1e-3\n", "did you mean 'optim'"),
    "wrong_type": ('[train]\nsteps = "many"\n', "train.steps must be int"),
    "missing_data": ('[data]\npath = "nowhere"\n', "not found"),
    "toml_syntax": ("[train\nsteps = 3\n", "not valid TOML"),
    "negative_lr": ("[optim]\nlr = -1.0\n", "optim.lr must be positive"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECIPES))
def test_bad_recipe_is_one_line_error(name, tmp_path):
    text, expected = BAD_RECIPES[name]
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(text)
    proc = run_cli_subprocess("pretrain", recipe, "--run-dir", tmp_path / "run", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_bad_override_names_the_key(cli, tmp_path):
    result = cli("pretrain", TINY, "--run-dir", tmp_path / "r", "--set", "train.batch_size=x", ok=False)
    assert result.exit_code == 2 and "--set train.batch_size must be int" in result.stderr
