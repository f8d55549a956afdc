"""`bigmodel plan RECIPE --tokens N`: wall time, chip-hours and dollars of a token budget, from the planned step."""

import json

import pytest

from tests.conftest import REPO

TINY = REPO / "recipes" / "tiny.toml"
SETTINGS = ["--set", "model.vocab_size=256", "--set", "model.dtype=bfloat16"]


def _tiny_flops_per_token() -> float:
    """Training FLOPs per token of tiny.toml at vocabulary 256, computed apart from plan (6N + attention)."""
    from bigmodel_cli.config import load_config
    from bigmodel_cli.model.sizing import count_params

    model = load_config(TINY, ["model.vocab_size=256"]).model
    _, non_embedding = count_params(model)
    return 6 * non_embedding + 12 * model.n_layers * model.max_seq_len * model.n_heads * model.dims_per_head


@pytest.fixture(scope="module")
def priced(cli) -> dict:
    """tiny.toml on the 8 test devices, priced for 2e9 tokens on TPU v5e at MFU 0.5 and $1.20 per chip-hour."""
    args = ["plan", TINY, *SETTINGS, "--tokens", "2e9", "--chip", "tpu V5E", "--mfu", "0.5"]
    return json.loads(cli(*args, "--price-per-chip-hour", "1.2", "--json").stdout)


def test_time_is_flops_times_tokens_over_chips_peak_and_mfu(priced):
    cost, tokens, peak = priced["cost"], 2e9, 197e12  # TPU v5e's bf16 peak in the chip table
    assert priced["model_flops_per_step"] == pytest.approx(_tiny_flops_per_token() * priced["tokens_per_step"])
    assert (cost["chip"], cost["chips"], cost["peak_flops_per_chip"]) == ("TPU v5e", 8, peak)  # the mesh's 8
    assert (cost["mfu"], cost["mfu_source"]) == (0.5, "--mfu")
    assert cost["training_flops"] == pytest.approx(_tiny_flops_per_token() * tokens)
    assert cost["seconds"] == pytest.approx(_tiny_flops_per_token() * tokens / (8 * peak * 0.5))
    assert cost["chip_hours"] == pytest.approx(cost["seconds"] * 8 / 3600)
    assert cost["dollars"] == pytest.approx(cost["chip_hours"] * 1.2)
    assert cost["chinchilla_tokens"] == 20 * priced["params"]  # Hoffmann et al.: 20 tokens per parameter


def test_chips_default_mfu_fp32_peak_and_the_printed_lines(cli):
    args = ["plan", TINY, "--set", "model.vocab_size=256", "--tokens", "1e12", "--chips", "64", "--chip", "TPU v5e"]
    text = cli(*args).stdout
    seconds = _tiny_flops_per_token() * 1e12 / (64 * 197e12 * 0.5 * 0.4)  # fp32 at half the bf16 peak, MFU 40%
    assert "on 64 x TPU v5e (98.5 TFLOP/s peak each in float32) at MFU 40% (default)" in text
    assert f"{seconds / 60:.1f} min wall" in text and f"{seconds * 64 / 3600:.3g} chip-hours" in text
    assert "$" not in text  # no price, no dollars
    assert "Chinchilla-optimal for this size: " in text and "20 per parameter" in text


def test_a_measured_mfu_for_the_chip_is_the_default(priced, monkeypatch):
    from bigmodel_cli import plan, utils

    monkeypatch.setitem(utils.MEASURED_MFU, "TPU v5e", (0.55, "docs/benchmarks.md"))
    cost = plan.training_cost(priced, 2e9, "TPU v5e")
    assert (cost["mfu"], cost["mfu_source"]) == (0.55, "measured: docs/benchmarks.md")
    assert cost["seconds"] == pytest.approx(priced["cost"]["seconds"] * 0.5 / 0.55)
    assert cost["dollars"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mfu", "0.5"], "--mfu only prices a token budget: add --tokens N"),
        (["--price-per-chip-hour", "2"], "--price-per-chip-hour only prices a token budget"),
        (["--chip", "TPU v5e"], "--chip only prices a token budget"),
        (["--tokens", "0", "--chip", "TPU v5e"], "--tokens 0: give a whole number of training tokens, above 0"),
        (["--tokens", "inf", "--chip", "TPU v5e"], "--tokens inf: give a whole number"),  # was an internal error
        (["--tokens", "1.5", "--chip", "TPU v5e"], "--tokens 1.5: give a whole number"),  # priced 1.5, showed 1
        (["--devices", "-1"], "--devices -1: give a number of devices, at least 1"),  # was an internal error
        (["--memory-budget-gb", "-1"], "--memory-budget-gb -1: give GiB per device above 0"),
        (["--tokens", "1e9", "--chip", "TPU v5e", "--mfu", "1.5"], "--mfu 1.5: give a fraction of peak in (0, 1]"),
        (["--tokens", "1e9", "--chip", "TPU v5e", "--mfu", "0"], "--mfu 0: give a fraction of peak in (0, 1]"),
        (["--tokens", "1e9", "--chip", "TPU v5e", "--chips", "0"], "--chips 0: give at least 1 chip"),
        (["--tokens", "1e9", "--chip", "TPU v5e", "--price-per-chip-hour", "-1"], "give a price above 0"),
        (["--tokens", "1e9", "--chip", "TPU v9"], "--chip 'TPU v9' is not in the peak table: use one of 'TPU v4'"),
        (["--tokens", "1e9"], "--tokens needs --chip NAME here (a CPU has no peak in the table)"),
    ],
)
def test_options_that_cannot_price_a_budget_are_refused_in_one_line(cli, args, message):
    result = cli("plan", TINY, *SETTINGS, *args, ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
