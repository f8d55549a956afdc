"""`bigmodel plan` compiles the step for the recipe's mesh and reports sizes, memory and shardings."""

import json

from tests.conftest import REPO

TINY = REPO / "recipes" / "tiny.toml"


def test_plan_reports_params_memory_and_shardings(cli):
    result = cli(
        "plan",
        TINY,
        "--devices",
        "8",
        "--set",
        "model.vocab_size=256",
        "--set",
        "mesh.data=2",
        "--set",
        "mesh.fsdp=2",
        "--set",
        "mesh.tensor=2",
        "--json",
    )
    plan = json.loads(result.stdout)
    assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and plan["devices"] == 8
    table = {row["name"]: row for row in plan["parameters"]}
    assert table["layers.0.mlp.gate_proj"]["sharding"] == "P('fsdp', 'tensor')"
    assert table["embed_tokens"]["shape"] == [256, 128]
    assert plan["params"] == sum(int(__import__("math").prod(r["shape"])) for r in plan["parameters"])
    per_device = plan["bytes_per_device"]
    # fsdp x tensor = 4-way sharding of every matrix: params per device are about a quarter of the total.
    assert per_device["params"] < plan["params"] * 4 / 3
    assert per_device["optimizer"] >= 2 * per_device["params"] - 4096
    assert plan["model_flops_per_step"] > 0 and plan["xla_flops_per_step_per_device"] > 0

    text = cli("plan", TINY, "--devices", "8", "--set", "model.vocab_size=256").stdout
    assert "layers.1.self_attn.q_proj" in text and "per device" in text


def test_plan_refuses_a_recipe_over_the_memory_budget(cli):
    result = cli("plan", TINY, "--set", "model.vocab_size=256", "--memory-budget-gb", "0.0001", ok=False)
    assert result.exit_code == 2
    assert "GiB per device" in result.stderr and "budget is 0.0001 GiB" in result.stderr
