"""The real CLI end to end on a tiny config, 8 fake devices, data-parallel mesh."""

import json
import re
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


def test_a_bad_recipe_is_refused_before_jax_is_imported(tmp_path):
    # The error comes in a third of a second instead of the second or more that loading the stack takes.
    recipe = tmp_path / "bad.toml"
    recipe.write_text(BAD_RECIPES["unknown_key"][0])
    proc = run_cli_subprocess("pretrain", recipe, check=False, env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert proc.returncode == 2 and "bigmodel_cli.config" in imported
    assert "jax" not in imported and "bigmodel_cli.pretrain" not in imported


def test_bad_override_names_the_key(cli, tmp_path):
    result = cli("pretrain", TINY, "--run-dir", tmp_path / "r", "--set", "train.batch_size=x", ok=False)
    assert result.exit_code == 2 and "--set train.batch_size must be int" in result.stderr


@pytest.mark.slow
def test_the_quickstart_learns_its_corpus_and_counts_as_the_readme_says(cli, tmp_path):
    """The README's first command: 300 steps bring the loss from the corpus' unigram entropy to a tenth of it,
    and the model counts where getting-started.md says it does."""
    out = cli("quickstart", "--out", tmp_path / "qs")
    text = out.stdout + out.stderr
    loss, entropy = (
        float(x) for x in re.search(r"validation loss ([\d.]+) nats/char \(unigram entropy ([\d.]+)", text).groups()
    )
    assert entropy == pytest.approx(2.854, abs=1e-3) and loss < 0.12 * entropy
    assert "count to seven: one two three four five six seven." in text
    assert {p.name for p in (tmp_path / "qs").iterdir()} == {"corpus.txt", "data", "run"}
