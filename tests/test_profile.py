"""`pretrain --profile-steps A:B`: a jax.profiler trace of steps A to B-1 in RUN/profile, through the real CLI."""

from __future__ import annotations

import collections
import gzip
import json
import re

import pytest

from tests.conftest import pretrain_args, run_cli_subprocess

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
