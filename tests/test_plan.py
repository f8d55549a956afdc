"""`bigmodel plan` compiles the step for the recipe's mesh and reports sizes, memory and shardings."""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_HF_SHAPE, pretrain_args

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
    # AdamW's two moments are sharded as the parameters are (not replicated on every device), plus step counts
    assert 2 * per_device["params"] - 4096 <= per_device["optimizer"] <= 2 * per_device["params"] + 64
    assert plan["model_flops_per_step"] > 0 and plan["xla_flops_per_step_per_device"] > 0

    text = cli("plan", TINY, "--devices", "8", "--set", "model.vocab_size=256").stdout
    assert "layers.1.self_attn.q_proj" in text and "per device" in text


def test_plan_refuses_a_recipe_over_the_memory_budget(cli):
    result = cli("plan", TINY, "--set", "model.vocab_size=256", "--memory-budget-gb", "0.0001", ok=False)
    assert result.exit_code == 2
    assert "GiB per device" in result.stderr and "budget is 0.0001 GiB" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# Planning to finetune a model: any model source, read from its config alone
# ----------------------------------------------------------------------------------------------------------

HUB_ID = "bigmodel-test/tiny-qwen"
PRICED = ("--tokens", "1e9", "--chip", "NVIDIA H100")  # plan --tokens; priced in tests/test_plan_cost.py


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict:
    """A tiny random Qwen2 saved by transformers in bfloat16 with tied embeddings, and its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        **TINY_HF_SHAPE,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    directory = tmp_path_factory.mktemp("qwen") / "qwen"
    model.save_pretrained(directory)
    return {"dir": directory, "config": config, "params": sum(p.numel() for p in model.parameters())}


def _plan(cli, *args) -> dict:
    return json.loads(cli("plan", *args, "--json").stdout)


def test_plan_to_finetune_a_hugging_face_model_fully_or_with_lora(cli, qwen):
    full = _plan(cli, f"hf:{qwen['dir']}")
    assert full["params"] == full["trainable_params"] == qwen["params"]
    assert {row["dtype"] for row in full["parameters"]} == {"bfloat16"}  # as stored, not float32
    assert full["tokens_per_step"] == 8 * 128  # finetuning's batch of 8, at the model's context

    lora = _plan(cli, f"hf:{qwen['dir']}", "--set", "lora.rank=8", "--set", "data.seq_len=64", *PRICED)
    c = qwen["config"]
    head = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    # rank x (in + out) for each attention projection (lora.targets' default) of each layer
    adapters = c.num_hidden_layers * 8 * ((c.hidden_size + q) * 2 + (c.hidden_size + kv) * 2)
    assert lora["trainable_params"] == adapters and lora["params"] == qwen["params"] + adapters
    assert {r["name"] for r in lora["parameters"] if r["trainable"]} == {
        f"layers.{i}.self_attn.{p}_proj_lora_{ab}" for i in range(2) for p in "qkvo" for ab in "ab"
    }
    assert lora["tokens_per_step"] == 8 * 64
    lora_bytes, full_bytes = lora["bytes_per_device"], full["bytes_per_device"]
    assert lora_bytes["optimizer"] < full_bytes["optimizer"] / 10  # AdamW state for the adapters only
    assert lora_bytes["total"] < full_bytes["total"]
    assert lora["model_flops_per_step"] < full["model_flops_per_step"]
    # priced from LoRA's own FLOPs (no weight gradient for frozen weights); no Chinchilla count for a finetune
    cost = lora["cost"]
    per_token = lora["model_flops_per_step"] / lora["tokens_per_step"]
    peak = 989e12 * (1 if lora["dtype"] == "bfloat16" else 0.5)  # H100's table peak, halved for fp32 compute
    assert cost["seconds"] == pytest.approx(per_token * 1e9 / (8 * peak * 0.4))  # the mesh's 8 devices, MFU 40%
    assert cost["chinchilla_tokens"] is None


def test_plan_refuses_settings_that_cannot_change_a_finetuning_plan(cli, qwen):
    for setting in ("optim.lr=1e-4", "train.steps=10", "finetune.init_from=runs/x"):
        result = cli("plan", f"hf:{qwen['dir']}", "--set", setting, ok=False)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
        assert f"--set {setting.partition('=')[0]} does not change" in result.stderr
        assert "train.batch_size, train.grad_accum, data.seq_len, lora.*, mesh.*" in result.stderr
    result = cli("plan", f"hf:{qwen['dir']}", "--set", "lora.rnak=8", ok=False)
    assert result.exit_code == 2 and "unknown key lora.rnak (did you mean 'rank'?)" in result.stderr
    result = cli("plan", f"hf:{qwen['dir']}", "--set", "train.batch_size=4", ok=False)  # on 8 devices
    assert result.exit_code == 2 and "batch_size / train.grad_accum = 4 does not divide by" in result.stderr


def test_plan_to_finetune_a_run_directory_its_checkpoint_and_export(cli, tiny_data, tmp_path):
    from bigmodel_cli.config import load_config
    from bigmodel_cli.model.sizing import count_params

    run = tmp_path / "run"
    settings = {"train.steps": 1, "train.batch_size": 8, "model.d_model": 32, "model.d_ff": 64}
    cli(*pretrain_args(run, tiny_data, settings))
    model_cfg = load_config(run / "config.toml").model
    plan = _plan(cli, run, "--set", "train.batch_size=16")
    assert plan["params"] == plan["trainable_params"] == count_params(model_cfg)[0]
    assert plan["tokens_per_step"] == 16 * model_cfg.max_seq_len
    assert _plan(cli, run / "checkpoints" / "1", "--set", "train.batch_size=16")["params"] == plan["params"]
    cli("export", run, "--out", tmp_path / "export")
    assert _plan(cli, tmp_path / "export", "--set", "train.batch_size=16")["params"] == plan["params"]


def test_plan_of_a_hub_model_reads_its_config_and_safetensors_header_only(cli, qwen, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.test_hub import MAIN, add_snapshot

    weights = (qwen["dir"] / "model.safetensors").read_bytes()
    header_only = weights[: 8 + int.from_bytes(weights[:8], "little")]  # no tensor data: none may be read
    files = {"config.json": (qwen["dir"] / "config.json").read_bytes(), "model.safetensors": header_only}
    add_snapshot(tmp_path / "cache", HUB_ID, MAIN, files, ("main",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    plan = _plan(cli, f"hf:{HUB_ID}")
    assert plan["params"] == qwen["params"] and {row["dtype"] for row in plan["parameters"]} == {"bfloat16"}

    result = cli("plan", "hf:bigmodel-test/absent", ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.stderr.strip()
    assert "\n" not in line and "is not in the cache" in line and "hf download bigmodel-test/absent" in line


def test_an_uncached_hub_model_fetches_its_config_json_alone(qwen, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from bigmodel_cli import modelio
    from tests.test_hub import MAIN, add_snapshot

    cache, fetched = tmp_path / "cache", []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def hf_hub_download(repo_id, filename, *, revision=None, **kwargs):  # the Hub, serving the saved model
        fetched.append(filename)
        data = (qwen["dir"] / filename).read_bytes()
        return str(add_snapshot(cache, repo_id, MAIN, {filename: data}, ("main",)) / filename)

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        assert local_files_only, "plan must not download a snapshot"
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model_cfg = modelio.model_config(Path(f"hf:{HUB_ID}"))
    assert fetched == ["config.json"]
    assert (model_cfg.d_model, model_cfg.param_dtype, model_cfg.tie_embeddings) == (64, "bfloat16", True)
