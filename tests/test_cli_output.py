"""What the CLI prints: plain text off a TTY, JSON lines on request, help with examples, report and runs."""

import json
import logging
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, pretrain_args, run_cli_subprocess

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TINY = REPO / "recipes" / "tiny.toml"


def test_non_tty_output_has_no_ansi_and_json_mode_is_json_lines(tiny_data, tmp_path, cli):
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

    # --quiet, runs and report: in this process (a CliRunner's output is no TTY either)
    quiet = cli("--quiet", *args[:3], tmp_path / "run_quiet", *args[4:])
    assert "step 2/4" not in quiet.stdout and "run_dir:" in quiet.stdout
    listing = cli("runs", tmp_path)
    assert "run_json" in listing.stdout and "finished" in listing.stdout

    report = cli("report", tmp_path / "run", tmp_path / "run_json", "--out", tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000 and "r.png" in report.stdout


def test_help_shows_examples_and_version(cli):
    top = cli("--help").stdout
    for name in ("preprocess", "pretrain", "evaluate", "generate", "export", "plan", "report", "runs"):
        assert name in top
        assert "Example: bigmodel" in cli(name, "--help").stdout
    assert re.match(r"bigmodel \d+\.\d+\.\d+", cli("--version").stdout)


def test_preprocess_reports_bytes_and_tokens_per_second(tmp_path):
    text = "".join(f"第{i}段 paragraph {i} of a corpus, with some words.\n\n" for i in range(3000))
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    common = ["preprocess", tmp_path / "c.txt", "--txt-mode", "paragraph", "--model-type", "char", "--workers", "1"]

    js = run_cli_subprocess("--log-format", "json", *common, "--out", tmp_path / "js")
    events = [json.loads(line) for line in js.stdout.strip().splitlines()]
    progress = [e for e in events if e.get("event") == "progress"]
    assert progress and progress[-1]["stage"] == "encode"
    manifest = json.loads((tmp_path / "js" / "manifest.json").read_text())
    splits = manifest["splits"]
    # Every byte of text read and every token written, counted once (paragraph separators are not text).
    assert progress[-1]["tokens"] == splits["train"]["tokens"] + splits["val"]["tokens"]
    assert progress[-1]["bytes"] == len(text.replace("\n\n", "").encode("utf-8"))
    assert progress[-1]["bytes_per_s"] > 0 and progress[-1]["tokens_per_s"] > 0

    plain = run_cli_subprocess(*common, "--out", tmp_path / "plain")
    assert re.search(r"encode \| [\d.]+ MB \| [\d.]+ MB/s \| [\d,]+ tokens \| [\d,]+ tok/s", plain.stdout)
    assert not ANSI.search(plain.stdout + plain.stderr)

    quiet = run_cli_subprocess("--quiet", *common, "--out", tmp_path / "quiet")
    assert "MB/s" not in quiet.stdout and "train_tokens:" in quiet.stdout


def test_progress_is_a_live_line_on_a_terminal(tmp_path):
    (tmp_path / "c.txt").write_text("a small corpus of words and more words\n" * 2000, encoding="utf-8")
    primary, secondary = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigmodel_cli", "preprocess", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"),
         "--txt-mode", "line", "--model-type", "char", "--workers", "1"],
        stdout=secondary, stderr=secondary, env={**os.environ, "TERM": "xterm", "COLUMNS": "160"},
    )  # fmt: skip
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + 120  # a hung child fails the test instead of hanging the suite
    while time.monotonic() < deadline:
        if not select.select([primary], [], [], 1.0)[0]:
            continue
        try:
            data = os.read(primary, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=5) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert ANSI.search(screen) and "tok/s" in screen and "train_tokens:" in screen


def test_long_evaluations_log_progress_lines_off_a_terminal(capsys):
    from bigmodel_cli import console

    try:
        console.set_track_mode("rich")  # stderr is captured here, so not a terminal: plain lines
        assert list(console.track(range(3), "generate", 3, every=0)) == [0, 1, 2]
        lines = capsys.readouterr().err.splitlines()
        assert [line.split(" | ")[:2] for line in lines] == [
            ["generate", "1/3"],
            ["generate", "2/3"],
            ["generate", "3/3"],
        ]
        console.set_track_mode("json")
        list(console.track(range(2), "score labels", 2, every=0))
        events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [(e["event"], e["stage"], e["done"], e["total"]) for e in events] == [
            ("progress", "score labels", 1, 2),
            ("progress", "score labels", 2, 2),
        ]
        console.set_track_mode("quiet")
        list(console.track(range(2), "generate", 2, every=0))
        assert capsys.readouterr().err == ""
    finally:
        console.set_track_mode("rich")


def test_cpu_hosts_compile_at_llvm_o2_and_only_stepping_commands_take_the_malloc_tunables(monkeypatch):
    from bigmodel_cli import cli, host

    seen = []
    monkeypatch.setattr(cli, "app", lambda prog_name: seen.append((os.environ["XLA_FLAGS"], "ran here")))

    class Reexec(Exception):  # os.execve does not return
        pass

    def execve(exe, argv, env):
        seen.append((env["XLA_FLAGS"], env["GLIBC_TUNABLES"]))
        raise Reexec

    monkeypatch.setattr(cli.os, "execve", execve)
    monkeypatch.setattr(cli.gc, "freeze", lambda: None)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("BIGMODEL_NO_REEXEC", raising=False)
    monkeypatch.setattr(host, "cpu_only_host", lambda: True)

    def main(flags, *argv):
        monkeypatch.setenv("XLA_FLAGS", flags)
        monkeypatch.setattr(cli.sys, "argv", ["bigmodel", *argv])
        try:
            cli.main()
        except Reexec:
            pass

    main("--xla_force_host_platform_device_count=2", "pretrain", "r.toml")
    main("--xla_backend_optimization_level=3", "--quiet", "finetune", "r.toml")
    main("", "plan", "r.toml")
    main("", "--log-format", "json", "runs", "dir")
    monkeypatch.setattr(host, "cpu_only_host", lambda: False)  # an accelerator host keeps XLA's and glibc's defaults
    main("", "pretrain", "r.toml")
    o2 = "--xla_backend_optimization_level=2"
    assert seen == [
        (f"--xla_force_host_platform_device_count=2 {o2}", host.CPU_MALLOC_TUNABLES),
        ("--xla_backend_optimization_level=3", host.CPU_MALLOC_TUNABLES),
        (o2, "ran here"),
        (o2, "ran here"),
        ("", "ran here"),
    ]
    # What benchmarks that call the library directly compile with, inference's scheduling included.
    assert host.cli_xla_flags("--a", inference=True) == f"--a {host.MEMORY_SCHEDULING}"  # the accelerator host
    monkeypatch.setattr(host, "cpu_only_host", lambda: True)
    assert host.cli_xla_flags("--a", inference=True) == f"--a {o2} {host.MEMORY_SCHEDULING}"
    users = "--xla_cpu_enable_concurrency_optimized_scheduler=true"  # a user's own scheduler choice wins
    assert host.cli_xla_flags(users, inference=True) == f"{users} {o2}"


def test_the_compile_cache_keeps_programs_over_half_a_second_unless_the_user_sets_a_threshold(monkeypatch):
    import jax

    from bigmodel_cli import utils

    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        users = float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])  # conftest's 0, read by JAX at import
        utils.enable_compilation_cache()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == users
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
        utils.enable_compilation_cache()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)


@pytest.mark.parametrize(
    "error, line",
    [
        (OSError(28, "No space left on device"), "error: No space left on device (check the path and free disk space)"),
        (
            PermissionError(13, "Permission denied", "/runs/a/metrics.json"),
            "error: /runs/a/metrics.json: Permission denied (check the path and free disk space)",
        ),
        (
            socket.gaierror(-2, "Name or service not known"),
            "error: [Errno -2] Name or service not known: the storage service could not be reached (check the "
            "network; for gs://, the credentials too: gcloud auth application-default login)",
        ),
    ],
)
def test_an_io_error_ends_the_command_in_one_line_that_says_where_to_look(cli, monkeypatch, tmp_path, error, line):
    """An OSError without a file name printed `error::`, and a bucket that could not be reached (no network: gcsfs
    raises a socket error after its retries) was blamed on the path and the disk."""
    from bigmodel_cli import cli_app

    def fail(*args):
        raise error

    monkeypatch.setattr(cli_app, "_check_storage_clients", fail)
    result = cli("runs", tmp_path, ok=False)
    assert result.exit_code == 1 and result.stderr.splitlines() == [line]
    assert logging.getLogger("gcsfs").level == logging.CRITICAL  # its per-try tracebacks stay out of the way


def test_a_log_format_other_than_rich_or_json_is_refused(cli, tmp_path):
    result = cli("--log-format", "xml", "runs", tmp_path, ok=False)
    assert result.exit_code == 2 and "Invalid value for '--log-format': 'xml': use rich or json" in result.output


def test_log_format_json_gives_one_json_object_per_line_from_every_command(cli, tiny_data, tmp_path):
    """The README promises `--log-format json` to scripts: tokenize, inspect, generate and plan printed text."""
    run = tmp_path / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 2, "checkpoint.every": 2}))
    commands = {
        "tokenize": ("tokenize", run, "--text", "the cat"),
        "inspect": ("inspect", run, "--prompt", "the cat", "--out", tmp_path / "inspect"),
        "generate": ("generate", run, "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0"),
        "plan": ("plan", REPO / "recipes" / "tiny.toml", "--set", f"data.path={tiny_data}"),
    }
    printed = {}
    for name, args in commands.items():
        lines = cli("--log-format", "json", *args).stdout.splitlines()
        printed[name] = [json.loads(line) for line in lines]  # every line an object
    assert set(printed["tokenize"][-1]) == {"ids", "tokens"} and printed["generate"][-1]["text"].startswith("the")
    assert "html" in json.dumps(printed["inspect"][-1]) and "params" in printed["plan"][-1]
