"""Issue #20's smaller faults: odd characters in config values, sampling options that are not numbers, text that
is not UTF-8, export file modes, and results that survive a directory that cannot be written."""

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from bigmodel_cli import atomic, config
from bigmodel_cli.errors import UserError
from bigmodel_cli.finetune import FinetuneConfig
from tests.conftest import pretrain_args

# Every control character TOML must escape, quotes, backslashes and non-ASCII text (NUL aside: no path holds it).
ODD = "".join(map(chr, range(1, 0x20))) + "\x7f \"quoted\" \\back\\slash\\ é中文😀 \\u0041 'single'"


@pytest.fixture(scope="module")
def world(cli, tiny_data, tmp_path_factory) -> dict:
    """A one-step run to generate from, export and evaluate."""
    root = tmp_path_factory.mktemp("small_faults")
    run = root / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 1, "checkpoint.every": 1}))
    return {"root": root, "run": run}


def _refused(result, *mentions: str) -> str:
    """The command exited 2 with exactly one stderr line, naming every one of `mentions`; that line."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.stderr)
    assert "Traceback" not in result.output and all(m in lines[0] for m in mentions), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 10. config.toml holds any string as valid TOML
# ---------------------------------------------------------------------------------------------------------


def test_config_toml_round_trips_every_control_character(tmp_path):
    data = tmp_path / ODD
    cfg = config.load_config(
        None, [f"data.path={data}", f"train.wandb_project=\x00{ODD}", f"mesh.rules={chr(0x7F)}\\\"'"]
    )
    assert cfg.data.path == str(data) and cfg.train.wandb_project == "\x00" + ODD
    written = tmp_path / "config.toml"
    written.write_text(config.dumps(cfg), encoding="utf-8")
    assert config.load_config(written, base_dir=tmp_path) == cfg
    for code in [*range(0x20), 0x7F]:  # one character at a time, so that each escape is checked on its own
        one = config.load_config(None, [f"train.wandb_project=a{chr(code)}b"])
        written.write_text(config.dumps(one), encoding="utf-8")
        assert config.load_config(written).train.wandb_project == f"a{chr(code)}b", hex(code)


def test_a_run_whose_data_path_holds_control_characters_resumes_and_exports(cli, tiny_data, tmp_path):
    data = tmp_path / 'da\x01ta "q" \\ é\x7f'  # `--set data.path=$'data/da\x01ta'` and friends
    shutil.copytree(tiny_data, data)
    args = pretrain_args(tmp_path / "run", data, {"train.steps": 1, "checkpoint.every": 1})
    cli(*args)
    assert config.load_config(tmp_path / "run" / "config.toml", base_dir=tmp_path / "run").data.path == str(data)
    cli(*args)  # the same command again reads config.toml and finds the run finished
    cli("export", tmp_path / "run", "--out", tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_nul_in_a_path_and_text_that_is_not_utf8_are_refused_in_one_line(tmp_path):
    recipe = tmp_path / "nul.toml"
    recipe.write_text('[data]\npath = "da\\u0000ta"\n')
    with pytest.raises(UserError, match=r"data\.path contains a NUL character"):
        config.load_config(recipe)
    with pytest.raises(UserError, match=r"--set data\.path is not valid UTF-8"):
        config.load_config(None, ["data.path=caf\udce9"])  # the byte 0xe9 of a Latin-1 shell, as Python passes it


# ---------------------------------------------------------------------------------------------------------
# 12. numbers: finite, and written in ASCII
# ---------------------------------------------------------------------------------------------------------

NONFINITE = [
    "optim.lr=inf",
    "optim.weight_decay=nan",
    "optim.min_lr_ratio=nan",
    "optim.b1=nan",
    "optim.eps=inf",
    "optim.grad_clip=inf",
    "optim.lr=-inf",
    "model.rope_theta=inf",
    "model.norm_eps=nan",
    "model.init_std=Infinity",
]


@pytest.mark.parametrize("override", NONFINITE)
def test_nonfinite_floats_are_refused_at_load_naming_the_key(override):
    key = override.partition("=")[0]
    with pytest.raises(UserError, match=rf"--set {key} must be a finite number"):
        config.load_config(None, [override])


@pytest.mark.parametrize("override", ["lora.alpha=nan", "lora.dropout=nan", "lora.alpha=inf"])
def test_nonfinite_lora_floats_are_refused(override):
    with pytest.raises(UserError, match=rf"--set {override.partition('=')[0]} must be a finite number"):
        config.load_config(None, [override], cls=FinetuneConfig)


def test_nonfinite_toml_literals_are_refused(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nweight_decay = nan\n")
    with pytest.raises(UserError, match=r"r\.toml: optim\.weight_decay must be a finite number, got nan"):
        config.load_config(recipe)


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=１２",
        "train.steps=١٢",
        "train.seed=𝟙",
        "optim.lr=３e-4",
        "optim.lr=0.００1",
        "model.tie_embeddings=ｔｒｕｅ",
    ],
)
def test_numbers_in_other_scripts_are_refused_naming_key_and_value(override):
    key, _, value = override.partition("=")
    with pytest.raises(UserError, match=rf"--set {key} must be \w+ in ASCII characters, got '{value}'"):
        config.load_config(None, [override])
    recipe = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8")
    with recipe:  # the same text as a TOML string value is parsed the same way
        section, _, name = key.partition(".")
        recipe.write(f'[{section}]\n{name} = "{value}"\n')
    try:
        with pytest.raises(UserError, match=rf"{name} must be \w+ in ASCII characters"):
            config.load_config(recipe.name)
    finally:
        os.unlink(recipe.name)


def test_ascii_numbers_still_parse():
    cfg = config.load_config(None, ["train.steps= 1_000 ", "optim.lr=3E-4", "optim.grad_clip=0", "train.seed=+7"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.grad_clip, cfg.train.seed) == (1000, 3e-4, 0.0, 7)


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.weight_decay=nan", "train.steps=１２"])
def test_pretrain_refuses_bad_numbers_before_making_the_run(cli, tiny_data, tmp_path, override):
    key, _, value = override.partition("=")
    run = tmp_path / "run"
    _refused(cli(*pretrain_args(run, tiny_data, {key: value}), ok=False), key, value)
    assert not run.exists()


# ---------------------------------------------------------------------------------------------------------
# 11. generate: sampling options and prompt text
# ---------------------------------------------------------------------------------------------------------

SAMPLING = ("--max-new-tokens", "--temperature", "--top-k", "--top-p")


@pytest.mark.parametrize(
    "option, value",
    [
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--temperature", "-1"),
        ("--top-p", "-0.5"),
        ("--top-p", "nan"),
        ("--top-p", "1.5"),
        ("--top-k", "-1"),
        ("--max-new-tokens", "0"),
        ("--max-new-tokens", "-3"),
    ],
)
def test_generate_refuses_bad_sampling_options_naming_the_one(cli, world, option, value):
    # --max-new-tokens 4 fits the model, so that only `option` can be wrong (given twice, the last one counts)
    result = cli("generate", world["run"], "--prompt", "ab", "--max-new-tokens", "4", option, value, ok=False)
    line = _refused(result, option)
    assert not any(other in line for other in SAMPLING if other != option), line


def test_generate_refuses_a_prompt_that_is_not_utf8(cli, world):
    # `--prompt $'\xff'`: Python hands the byte 0xff on as the surrogate escape '\udcff'
    short = ("--max-new-tokens", "4")
    _refused(cli("generate", world["run"], "--prompt", "ab\udcff", *short, ok=False), "--prompt is not valid", "0xff")
    _refused(cli("generate", world["run"], "--prompt", "ab", "--stop", "\udce9", *short, ok=False), "--stop is not")
    assert cli("generate", world["run"], "--prompt", "ab é", *short).stdout.startswith("ab é")  # UTF-8 is fine


# ---------------------------------------------------------------------------------------------------------
# 12. exported files get the umask's mode, like their siblings
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(directory) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*")}


@pytest.mark.parametrize("format", ["bigmodel", "hf"])
def test_every_exported_file_gets_the_umask_mode(cli, world, format):
    out = world["root"] / f"export-{format}"
    with _umask(0o022):
        cli("export", world["run"], "--out", out, "--format", format)
    modes = _modes(out)
    assert any(name.endswith(".safetensors") for name in modes)
    assert modes == {n: 0o755 if (out / n).is_dir() else 0o644 for n in modes}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_staged_files_written_through_a_temporary_file_get_the_umask_mode(tmp_path):
    out = tmp_path / "out"
    with _umask(0o027), atomic.new_dir(out, "output") as staging:
        fd, tmp = tempfile.mkstemp(dir=staging)  # 0600, as safetensors leaves its files
        os.close(fd)
        os.replace(tmp, staging / "weights.bin")
        (staging / "sub").mkdir()
        (staging / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(staging / "run.sh", 0o700)
    assert _modes(out) == {"weights.bin": 0o640, "sub": 0o750, "run.sh": 0o750}


# ---------------------------------------------------------------------------------------------------------
# 12. evaluate in a directory that cannot be written: results still printed, one warning
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _read_only(directory, monkeypatch):
    """Make `directory` refuse writes: chmod for a normal user; for root (whom chmod doesn't stop) a read-only
    bind mount of it over itself where the machine allows mounts, else a publish step (os.replace) that fails."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield "chmod"
        finally:
            directory.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", directory, directory], capture_output=True).returncode == 0
    if mounted:
        remounted = subprocess.run(["mount", "-o", "remount,ro,bind", directory], capture_output=True)
        if remounted.returncode == 0:
            try:
                yield "read-only bind mount"
            finally:
                subprocess.run(["umount", directory], check=True)
            return
        subprocess.run(["umount", directory], check=True)
    real_replace = os.replace

    def refuse(src, dst, *args, **kwargs):
        if str(dst).startswith(str(directory)):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)
    yield "refusing os.replace"


def _warned(result, mentions: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("warning: could not write") and mentions in lines[0] and "--out DIR" in lines[0]


def test_evaluate_on_a_read_only_run_prints_results_and_warns(cli, world, monkeypatch):
    run = world["run"]
    before = (run / "metrics.json").read_bytes() if (run / "metrics.json").exists() else None
    with _read_only(run, monkeypatch) as how:
        result = cli("evaluate", run, "--json", "--max-batches", "1", ok=False)
    _warned(result, "metrics.json")
    assert "loss" in json.loads(result.stdout.strip().splitlines()[-1]), how
    after = (run / "metrics.json").read_bytes() if (run / "metrics.json").exists() else None
    assert after == before
    out = world["root"] / "eval-out"
    cli("evaluate", run, "--json", "--max-batches", "1", "--out", out)  # the suggested way out
    assert "loss" in json.loads((out / "metrics.json").read_text())


def test_task_evaluate_in_a_read_only_directory_prints_results_and_warns(cli, tmp_path, monkeypatch):
    squad = {"data": [{"paragraphs": [{"context": "Paris is big.", "qas": [{"id": "a", "question": "Where?"}]}]}]}
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [{"text": "Paris", "answer_start": 0}]
    (tmp_path / "dev.json").write_text(json.dumps(squad))
    (tmp_path / "preds.json").write_text(json.dumps({"a": "Paris"}))
    (tmp_path / "eval-qa").mkdir()  # made by an earlier run; now read-only like its parent
    args = ("evaluate", "--task", "qa", "--data", tmp_path / "dev.json", "--predictions", tmp_path / "preds.json")
    with _read_only(tmp_path, monkeypatch):
        result = cli(*args, "--json", ok=False)
    _warned(result, str(tmp_path / "eval-qa"))
    assert json.loads(result.stdout.strip().splitlines()[-1])["exact_match"] == 100.0
    assert list((tmp_path / "eval-qa").iterdir()) == []  # no half-written temporary file either
