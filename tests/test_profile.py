"""`pretrain --profile-steps A:B`: a jax.profiler trace of steps A to B-1 in RUN/profile, through the real CLI."""

from __future__ import annotations

import collections
import gzip
import json
import re
import subprocess
import sys

import pytest

from bigmodel_cli import config, storage
from bigmodel_cli.errors import UserError
from bigmodel_cli.train import profile
from tests.conftest import REPO, pretrain_args, run_cli_subprocess

STEPS = {"train.steps": 5, "train.log_every": 5, "checkpoint.every": 5, "train.eval_batches": 1}


@pytest.fixture(scope="module")
def profiled(cli, tiny_data, tmp_path_factory):
    """A 5-step tiny run that traces steps 2 and 3, then resumed to step 7 with the same range."""
    run = tmp_path_factory.mktemp("profiled") / "run"
    first = cli(*pretrain_args(run, tiny_data, STEPS, "--profile-steps", "2:4"))
    traces = sorted((run / "profile" / "plugins" / "profile").iterdir())
    resumed = cli(
        *pretrain_args(run, tiny_data, {**STEPS, "train.steps": 7}, "--profile-steps", "2:4", "--allow-config-change")
    )
    return run, first, traces, resumed


def test_trace_is_written_into_the_run(profiled):
    run, first, traces, _ = profiled
    assert len(traces) == 1, traces
    xplanes = list(traces[0].glob("*.xplane.pb"))
    assert len(xplanes) == 1 and xplanes[0].stat().st_size > 10_000, xplanes
    assert f"profile of steps 2 to 3 written to {run / 'profile'}" in first.stderr + first.stdout


def test_trace_holds_exactly_the_traced_steps(profiled):
    """Every XLA op of the step ran as often in the trace as in 2 whole steps, on each of the 8 devices."""
    _, _, traces, _ = profiled
    (perfetto,) = traces[0].glob("perfetto_trace.json.gz")
    trace = json.load(gzip.open(perfetto))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    fusions = collections.Counter(
        e["name"] for e in events if e.get("ph") == "X" and re.fullmatch(r"\w*fusion(\.\d+)?", e["name"])
    )
    assert len(fusions) > 20, fusions
    assert set(fusions.values()) == {2 * 8}, collections.Counter(fusions.values())


def test_top_ops_script_reads_the_trace(profiled):
    """scripts/bench/trace_top_ops.py (the table in docs/profiling.md): each fusion once per step and device."""
    run, _, _, _ = profiled
    script = REPO / "scripts" / "bench" / "trace_top_ops.py"
    out = subprocess.run(
        [sys.executable, script, run, "--steps", "2", "--top", "400"], capture_output=True, text=True, check=True
    ).stdout
    fusions = [line.split("|") for line in out.splitlines() if re.match(r"\| `\w*fusion(\.\d+)?` \|", line)]
    assert len(fusions) > 20 and all(cells[3].strip() == "8" for cells in fusions), out
    assert all(float(cells[2]) >= 0 for cells in fusions)


def test_resume_past_the_range_traces_nothing(profiled):
    run, _, _, resumed = profiled
    assert "resumed at step 6, no trace" in resumed.stderr + resumed.stdout
    assert len(list((run / "profile" / "plugins" / "profile").iterdir())) == 1
    assert json.loads((run / "status.json").read_text())["step"] == 7


@pytest.mark.parametrize("steps", ["0:2", "3:3", "4:2", "2:6", "2-4", "a:b"])
def test_bad_range_is_one_line_error(cli, tiny_data, tmp_path, steps):
    result = cli(*pretrain_args(tmp_path / "run", tiny_data, STEPS, "--profile-steps", steps), ok=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "--profile-steps / train.profile_steps must be A:B with 1 <= A < B <= train.steps (5)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_bad_range_in_a_recipe_exits_2_without_traceback(tiny_data, tmp_path):
    proc = run_cli_subprocess(
        *pretrain_args(tmp_path / "run", tiny_data, {**STEPS, "train.profile_steps": "3"}), check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "error: --profile-steps / train.profile_steps must be A:B with 1 <= A < B <= train.steps (5), tracing "
        "steps A to B-1, e.g. 2:4; got '3'"
    ]


def test_finetune_takes_the_option(cli):
    result = cli("finetune", "--task", "qa", "--profile-steps", "0:2", ok=False)
    assert result.exit_code == 2 and "--profile-steps / train.profile_steps must be A:B" in result.stderr


def test_trace_to_a_bucket_is_refused():
    cfg = config.load_config(None, ["train.steps=5", "train.profile_steps=2:4"])
    with pytest.raises(UserError, match="writes its trace to a local directory"):
        profile.check(cfg, storage.path("gs://bucket/run"))
    profile.check(cfg, storage.path("/tmp/run"))  # a local one is fine
