"""Preference tuning (`finetune --task preference`, `evaluate --task preference`): losses equal to TRL's, learning
on a synthetic preference world, one copy of the base weights under LoRA, and bad pairs skipped or refused."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

from bigmodel_cli import modelio
from bigmodel_cli.config import MeshConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.parallel import make_mesh
from bigmodel_cli.tasks.options import TaskOptions
from bigmodel_cli.tasks.preference import Preference
from bigmodel_cli.train import preference as P
from tests.conftest import TINY_HF_SHAPE
from tests.test_hf_tokenizer import byte_level_dir

# Unequal prompt and completion lengths, so that rows pad differently.
TEXT_PAIRS = [
    {"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " ran"},
    {"prompt": "A longer prompt about the dog and the", "chosen": " yes", "rejected": " no, it did not go there"},
    {"prompt": "Hello", "chosen": " world and more words here", "rejected": " there"},
]
# Chats rendered with the tokenizer's chat template (tests/test_hf_tokenizer.py's <|im_start|> style).
CHAT_PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Two plus two?"}],
        "chosen": [{"role": "assistant", "content": "Four."}],
        "rejected": [{"role": "assistant", "content": "Five."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sky colour?"},
        ],
        "chosen": [{"role": "assistant", "content": "Blue"}],
        "rejected": [{"role": "assistant", "content": "Green or red"}],
    },
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Two tiny random transformers Llamas (policy and reference) sharing a BOS-adding byte-level tokenizer with
    a chat template, each saved with it as a model directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf_pair")
    dirs = {}
    for seed, name in enumerate(("policy", "reference")):
        directory = byte_level_dir(root / name, True)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            **TINY_HF_SHAPE,
            max_position_embeddings=64,
            initializer_range=0.05,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        LlamaForCausalLM(config).eval().save_pretrained(directory)
        dirs[name] = directory
    return dirs


def _trl_dpo(hf_pair, pairs: list[dict], loss_type: str, beta: float) -> tuple[float, dict, list[dict]]:
    """TRL's DPO loss and metrics on one batch of `pairs` (its own tokenization, collation and loss), and the
    token ids it trained on."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    policy, reference = (AutoModelForCausalLM.from_pretrained(hf_pair[n]).eval() for n in ("policy", "reference"))
    args = DPOConfig(
        output_dir=str(hf_pair["policy"].parent / "trl"),
        report_to="none",
        beta=beta,
        loss_type=[loss_type],
        max_length=64,
        use_cpu=True,
        bf16=False,  # its default on a CPU with bf16 puts the prepared reference model under bf16 autocast
    )
    tokenizer = AutoTokenizer.from_pretrained(hf_pair["policy"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            policy, reference, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
        )
        rows = [trainer.train_dataset[i] for i in range(len(pairs))]
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, trainer.data_collator(rows), False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # eval mode: the models are in .eval()
    return float(loss), metrics, rows


def _trl_simpo(hf_pair, rows: list[dict], beta: float, gamma: float) -> tuple[np.ndarray, np.ndarray, tuple]:
    """TRL's SimPO losses and chosen/rejected rewards per pair (CPOTrainer.cpo_loss with loss_type="simpo", on
    its length-averaged log-probabilities from CPOTrainer.get_batch_logps), for TRL's tokenized `rows`; and
    those log-probabilities."""
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOTrainer

    model = AutoModelForCausalLM.from_pretrained(hf_pair["policy"]).eval()
    logps = []
    for side in ("chosen", "rejected"):
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
            labels = ids.clone()
            labels[0, : len(row["prompt_ids"])] = -100
            with torch.no_grad():
                logits = model(ids).logits
            logps.append(CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True))
    chosen, rejected = torch.cat(logps[: len(rows)]), torch.cat(logps[len(rows) :])
    trainer = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    return losses.numpy(), np.stack([chosen_rewards.numpy(), rejected_rewards.numpy()], axis=-1), (chosen, rejected)


def _ours(hf_pair, pairs: list[dict], tmp_path: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """bigmodel's encoded pairs, and its policy log-probabilities, token counts and reference log-probabilities."""
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    policy, reference = (modelio.load(Path(f"hf:{hf_pair[n]}"), mesh) for n in ("policy", "reference"))
    kind = Preference()
    examples, _ = kind.load(_write_jsonl(tmp_path / "pairs.jsonl", pairs), TaskOptions())
    encoded = kind.encode(examples, policy.tokenizer("test"), 64, TaskOptions())
    logps = P.all_sequence_logps(policy.graphdef, policy.params, encoded, 4, mesh)
    ref = P.all_sequence_logps(reference.graphdef, reference.params, encoded, 4, mesh)
    counts = np.stack([encoded["chosen_weights"].sum(-1), encoded["rejected_weights"].sum(-1)], axis=-1)
    return encoded, logps, counts, ref


def _trained_tokens(encoded: dict, side: str, row: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, completion tokens) of an encoded row: before and at its weights."""
    weights, targets = encoded[f"{side}_weights"][row], encoded[f"{side}_targets"][row]
    first = int(np.argmax(weights > 0))
    inputs = encoded[f"{side}_inputs"][row]
    return [int(t) for t in inputs[: first + 1]], [int(t) for t in targets[weights > 0]]


@pytest.mark.parametrize("layout", ["text", "chat"])
def test_losses_and_rewards_equal_trl(hf_pair, tmp_path, layout):
    pairs = TEXT_PAIRS if layout == "text" else CHAT_PAIRS
    encoded, logps, counts, ref = _ours(hf_pair, pairs, tmp_path)
    for loss_type, ours_name, beta in (("sigmoid", "dpo", 0.1), ("ipo", "ipo", 0.5)):
        trl_loss, trl_metrics, rows = _trl_dpo(hf_pair, pairs, loss_type, beta)
        for i, row in enumerate(rows):  # the same tokens: prompt (BOS first), then each completion
            for side in ("chosen", "rejected"):
                assert _trained_tokens(encoded, side, i) == (row["prompt_ids"], row[f"{side}_ids"])
        ours = P.pair_losses(P.PreferenceConfig(loss=ours_name, beta=beta), logps, counts, ref)
        assert float(np.mean(ours["loss"])) == pytest.approx(trl_loss, abs=1e-5)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert float(np.mean(ours[name])) == pytest.approx(trl_metrics[name], abs=1e-5), name
        for name in ("logps/chosen", "logps/rejected"):  # sums over up to 30 tokens: f32 relative agreement
            assert float(np.mean(ours[name])) == pytest.approx(trl_metrics[name], rel=1e-5), name
    # SimPO: no reference, length-averaged log-probabilities, a target margin gamma.
    trl_losses, trl_rewards, trl_means = _trl_simpo(hf_pair, rows, beta=2.0, gamma=0.5)
    ours = P.pair_losses(P.PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma=0.5), logps, counts, None)
    np.testing.assert_allclose(ours["loss"], trl_losses, atol=1e-5)
    np.testing.assert_allclose(np.stack([ours["rewards/chosen"], ours["rewards/rejected"]], -1), trl_rewards, atol=1e-5)
    # ORPO's odds-ratio term (ORPOTrainer.odds_ratio_loss: beta * log sigmoid(log odds)) on the same averages;
    # the rest of our ORPO loss is the chosen completion's NLL, averaged per pair (TRL: over the batch's tokens).
    from trl.experimental.orpo import ORPOTrainer

    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    odds_losses, *_, log_odds = ORPOTrainer.odds_ratio_loss(trainer, *trl_means)
    ours = P.pair_losses(P.PreferenceConfig(loss="orpo", beta=0.1), logps, counts, None)
    np.testing.assert_allclose(ours["nll_loss"] - ours["loss"], odds_losses.numpy(), atol=1e-5)
    assert float(np.mean(ours["log_odds_chosen"])) == pytest.approx(float(log_odds), abs=1e-5)


# ---- learning: a synthetic preference world -----------------------------------------------------------------
# The prompt states a rule, "use abcd" or "use wxyz"; the chosen answer follows it (four letters from the named
# set), the rejected one uses the other set. The supervised data holds both answers of every prompt, as scraped
# data would, so the SFT model imitates both: only the preferences say which one is right.
SETS = ("abcd", "wxyz")


def _world_pairs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        rule = int(rng.integers(2))
        noise = "".join(rng.choice(list("efghijklmnop"), 3))
        answers = [" ".join(rng.choice(list(SETS[k]), 4)) for k in (rule, 1 - rule)]
        pairs.append(
            {
                "prompt": [{"role": "user", "content": f"{noise} use {SETS[rule]}"}],
                "chosen": [{"role": "assistant", "content": answers[0]}],
                "rejected": [{"role": "assistant", "content": answers[1]}],
            }
        )
    return pairs


SMALL = ["--set", "train.batch_size=16", "--set", "data.seq_len=48"]
SMALL += ["--set", "train.log_every=25", "--set", "train.eval_batches=2", "--set", "optim.warmup_steps=10"]


@pytest.fixture(scope="module")
def world(cli, hf_pair, tmp_path_factory):
    """SFT on both answers of every pair, then DPO from the SFT model, then evaluations of both on held-out
    pairs: the whole flow through the CLI, run once for the tests below."""
    import time

    root = tmp_path_factory.mktemp("preference_world")
    train, held_out = _world_pairs(320, seed=1), _world_pairs(64, seed=2)
    pairs = _write_jsonl(root / "pairs.jsonl", train)
    _write_jsonl(root / "held_out.jsonl", held_out)
    sft_rows = [{"messages": [*p["prompt"], *p[side]]} for p in train for side in ("chosen", "rejected")]
    _write_jsonl(root / "sft.jsonl", sft_rows)
    times = {}
    started = time.perf_counter()
    cli(
        "finetune", "--task", "instruct", "--init-from", f"hf:{hf_pair['policy']}", "--data", root / "sft.jsonl",
        "--run-dir", root / "sft", *SMALL, "--set", "train.steps=150", "--set", "optim.lr=3e-3",
        "--set", "task.max_target_tokens=16", "--set", "checkpoint.every=150",
    )  # fmt: skip
    times["sft"] = time.perf_counter() - started
    started = time.perf_counter()
    cli(
        "finetune", "--task", "preference", "--init-from", root / "sft", "--data", pairs, "--run-dir", root / "dpo",
        *SMALL, "--set", "train.steps=150", "--set", "optim.lr=1e-3", "--set", "checkpoint.every=150",
    )  # fmt: skip
    times["dpo"] = time.perf_counter() - started
    cli("export", root / "dpo", "--format", "hf", "--out", root / "dpo-hf")
    scores = {}
    for name in ("sft", "dpo", "dpo-hf"):
        model = f"hf:{root / name}" if name == "dpo-hf" else root / name
        args = ["evaluate", model, "--task", "preference", "--data", root / "held_out.jsonl", "--json"]
        ref = ["--ref", root / "sft"] if name != "dpo" else []  # the run records its start; an export does not
        scores[name] = json.loads(cli(*args, *ref).stdout.splitlines()[-1])
    print(f"preference world: SFT {times['sft']:.1f}s, DPO {times['dpo']:.1f}s; {scores}")
    return {"root": root, "scores": scores, "times": times}


def test_dpo_learns_the_rule_the_supervised_model_cannot_tell(world):
    sft, dpo = world["scores"]["sft"], world["scores"]["dpo"]
    assert sft["reward_accuracy"] == 0.5 and sft["reward_margin"] == 0  # against itself: every pair a tie
    assert dpo["ref"] == str(world["root"] / "sft")  # the default reference: the run's starting point
    assert dpo["pairs"] == 64 and dpo["reward_accuracy"] >= 0.9 and dpo["reward_margin"] > 0
    assert sft["win_rate"] < 0.75 < 0.9 <= dpo["win_rate"]
    # Exported for transformers (the last step of SFT -> DPO -> export), the model ranks the pairs the same.
    exported = world["scores"]["dpo-hf"]
    assert exported["reward_accuracy"] == dpo["reward_accuracy"]
    assert exported["reward_margin"] == pytest.approx(dpo["reward_margin"], rel=1e-4)


def test_the_default_reference_must_be_the_weights_the_run_started_from(cli, world, monkeypatch):
    """The run names its reference by path (init_from): trained on since, it would give other rewards without a
    word. The run records a digest of its starting weights; a changed one is refused, a --ref given is not."""
    from bigmodel_cli import modelio

    monkeypatch.setattr(modelio, "checkpoint_digest", lambda params: "the weights of a run that trained on")
    args = ("evaluate", world["root"] / "dpo", "--task", "preference", "--data", world["root"] / "held_out.jsonl")
    refused = cli(*args, "--out", world["root"] / "refused", ok=False)
    assert refused.exit_code == 2 and "changed since (its weights differ" in refused.stderr
    given = cli(*args, "--ref", world["root"] / "sft", "--out", world["root"] / "given", "--json")
    assert json.loads(given.stdout.splitlines()[-1])["reward_margin"] == world["scores"]["dpo"]["reward_margin"]


def test_training_logs_trl_metric_names(world):
    lines = [json.loads(line) for line in (world["root"] / "dpo" / "metrics.jsonl").read_text().splitlines()]
    names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    )
    assert all(name in lines[-1] for name in (*names, "loss", "val_loss"))
    assert lines[-1]["rewards/accuracies"] >= 0.9 and lines[-1]["rewards/margins"] > lines[0]["rewards/margins"] > 0
    assert lines[-1]["loss"] < lines[0]["loss"] < 0.7  # DPO starts at log 2 = 0.693 and falls
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bigmodel_cli.runlog import TENSORBOARD_DIR

    events = EventAccumulator(str(world["root"] / "dpo" / TENSORBOARD_DIR)).Reload()
    assert {f"train/{name}" for name in names} <= set(events.Tags()["scalars"])


def _device_elements() -> int:
    """Elements held on the first device now: each buffer once, however many arrays (a sharded array and the
    single-device arrays it was assembled from) share it."""
    import gc

    gc.collect()
    device, buffers = jax.devices()[0], {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            if shard.device == device:
                buffers[shard.data.unsafe_buffer_pointer()] = shard.data.size
    return sum(buffers.values())


def test_lora_dpo_holds_one_copy_of_the_base_weights(cli, world, monkeypatch, tmp_path):
    from bigmodel_cli.model.sizing import count_params
    from bigmodel_cli.train import loop

    seen = {}
    check_fits = loop.check_fits

    def spy(cfg, mesh, state, seq_len):  # right after the train state is built, before the step compiles
        seen["base"] = count_params(cfg.model)[0]
        seen["state"] = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in state.items()}
        seen["device"] = _device_elements() - seen["before"]
        return check_fits(cfg, mesh, state, seq_len)

    monkeypatch.setattr(loop, "check_fits", spy)
    seen["before"] = _device_elements()
    cli(
        "finetune", "--task", "preference", "--init-from", world["root"] / "sft", "--run-dir", tmp_path / "lora",
        "--data", world["root"] / "pairs.jsonl", *SMALL, "--set", "train.steps=2", "--set", "lora.rank=4",
    )  # fmt: skip
    base, state = seen["base"], seen["state"]
    adapters = state["params"]
    assert state["frozen"] == base and adapters < base / 10  # the base, frozen; the adapters train
    # On the device: the base weights once, the adapters with Adam's two moments, and the reference's
    # log-probabilities (2 per pair): no second model for the reference, which is the base with adapters off.
    assert seen["device"] <= base + 3 * adapters + 2 * 320 + 16
    assert seen["device"] >= base + 3 * adapters


def _bad_pairs() -> list[dict]:
    return [
        {"id": "ok", "prompt": "a b", "chosen": " c", "rejected": " d"},
        {"id": "empty", "prompt": "a b", "chosen": "", "rejected": " d"},
        {"id": "blank", "prompt": "a b", "chosen": " c", "rejected": "   "},
        {"id": "same", "prompt": "a b", "chosen": " c", "rejected": " c"},
        {"id": "long", "prompt": "x " * 80, "chosen": " c", "rejected": " d"},
        {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"},
    ]


def test_bad_pairs_are_skipped_with_a_count(hf_pair, tmp_path):
    from bigmodel_cli.data.tokenizer import open_tokenizer

    kind, info = Preference(), {}
    with pytest.warns(UserWarning, match="skipped 3 pairs with an empty chosen or rejected completion or identical"):
        examples, info = kind.load(_write_jsonl(tmp_path / "bad.jsonl", _bad_pairs()), TaskOptions())
    assert info["skipped_empty"] == 3 and [e.id for e in examples] == ["ok", "long", "chat"]
    with pytest.warns(UserWarning, match="1 of 3 pairs left out: their prompt fills data.seq_len=32"):
        encoded = kind.encode(examples, open_tokenizer(hf_pair["policy"]), 32, TaskOptions())
    assert encoded["example_index"].tolist() == [0, 2]
    # Every row trains on its completion only, and chosen and rejected share the prompt.
    assert all(encoded[f"{side}_weights"].sum(-1).min() > 0 for side in ("chosen", "rejected"))
    assert (encoded["chosen_inputs"][:, :3] == encoded["rejected_inputs"][:, :3]).all()


def test_nothing_left_is_refused_in_one_line(cli, hf_pair, tmp_path):
    only_bad = [p for p in _bad_pairs() if p["id"] in ("empty", "same")]
    result = cli(
        "finetune", "--task", "preference", "--init-from", f"hf:{hf_pair['policy']}",
        "--data", _write_jsonl(tmp_path / "bad.jsonl", only_bad), "--run-dir", tmp_path / "run", ok=False,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "no usable preference examples" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
    long_only = [p for p in _bad_pairs() if p["id"] == "long"] * 2
    result = cli(
        "finetune", "--task", "preference", "--init-from", f"hf:{hf_pair['policy']}", "--set", "data.seq_len=32",
        "--data", _write_jsonl(tmp_path / "long.jsonl", long_only), "--run-dir", tmp_path / "run", ok=False,
    )  # fmt: skip
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert result.exit_code != 0 and len(lines) == 1 and "no preference pair fits data.seq_len=32" in lines[0]


def test_preference_settings_are_refused_for_other_tasks(cli, hf_pair, tmp_path):
    result = cli(
        "finetune", "--task", "instruct", "--init-from", f"hf:{hf_pair['policy']}", "--data", tmp_path / "x.jsonl",
        "--set", "preference.beta=0.5", ok=False,
    )  # fmt: skip
    assert result.exit_code != 0 and "[preference] applies to --task preference" in result.stderr
    with pytest.raises(UserError, match="preference.loss must be one of dpo, ipo, simpo, orpo"):
        P.PreferenceConfig(loss="kto")


def test_show_examples_marks_the_chosen_completion(cli, hf_pair, tmp_path):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [p for p in _bad_pairs() if p["id"] in ("ok", "chat")] * 2)
    shown = cli(
        "finetune", "--task", "preference", "--init-from", f"hf:{hf_pair['policy']}", "--data", pairs,
        "--show-examples", "1", "--run-dir", tmp_path / "run",
    ).stdout  # fmt: skip
    assert "a b" in shown and " c" in shown and not (tmp_path / "run").exists()


def test_an_export_of_a_preference_run_is_scored_with_the_runs_beta(cli, world, tmp_path):
    """An export has no config.toml: its rewards took the default beta 0.1. task.json now carries [preference]."""
    root = world["root"]
    run, export = tmp_path / "beta", tmp_path / "beta-export"
    cli(
        "finetune", "--task", "preference", "--init-from", root / "sft", "--data", root / "pairs.jsonl",
        "--run-dir", run, *SMALL, "--set", "train.steps=1", "--set", "preference.beta=0.5",
    )  # fmt: skip
    cli("export", run, "--out", export)
    scores = []
    for model in (run, export):
        args = ("evaluate", model, "--task", "preference", "--data", root / "held_out.jsonl", "--ref", root / "sft")
        scores.append(
            json.loads(cli(*args, "--out", tmp_path / f"eval-{model.name}", "--json").stdout.splitlines()[-1])
        )
    assert scores[0]["beta"] == scores[1]["beta"] == 0.5
    assert scores[1]["reward_margin"] == pytest.approx(scores[0]["reward_margin"], rel=1e-5)


def test_anthropic_hh_whole_texts_are_cut_into_a_prompt_as_trl_cuts_them(hf_pair, tmp_path):
    """HH's pairs are two whole texts, the prompt being where they start alike: TRL's extract_prompt cuts them
    (the space before the first difference stays with the completions). They were refused."""
    from trl.data_utils import extract_prompt

    hh = [
        {
            "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: four.",
            "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: five",
        },
        {
            "chosen": "\n\nHuman: 天空是什么颜色？\n\nAssistant: 蓝色。",
            "rejected": "\n\nHuman: 天空是什么颜色？\n\nAssistant: 绿色",
        },
        {"chosen": "Q: name a colour. A: red", "rejected": "Q: name a colour. A: a colour"},
    ]
    kind, tokenizer = Preference(), modelio.load(Path(f"hf:{hf_pair['policy']}")).tokenizer("test")
    encoded = []
    for name, rows in (("hh", hh), ("explicit", [extract_prompt(row) for row in hh])):
        examples, _ = kind.load(_write_jsonl(tmp_path / f"{name}.jsonl", rows), TaskOptions())
        encoded.append(kind.encode(examples, tokenizer, 64, TaskOptions()))
    assert extract_prompt(hh[2])["chosen"] == " red" and encoded[0].keys() == encoded[1].keys()  # space: completion's
    assert all(np.array_equal(encoded[0][key], encoded[1][key]) for key in encoded[0])
