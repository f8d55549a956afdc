"""Every task finetunes and evaluates end to end through the CLI; LoRA trains adapters only and merges."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bigmodel_cli import config, finetune, modelio
from bigmodel_cli.tasks.chat import CHAT_TEMPLATE, END_OF_TURN, EXPORTED_CHAT_TEMPLATE, ChatFormat
from tests.conftest import synthetic_text

PROMPT_WORDS = (
    "Context: Question: Answer: Text: Label: Document: Summary: Translate English to German: "
    "<|system|> <|user|> <|assistant|> <|end|> ### Instruction: Input: Response: unanswerable "
    "positive negative Der Hund läuft. 北京是中国的首都。长城在北方。李白写诗。"
)


@pytest.fixture(scope="module")
def base_model(cli, tmp_path_factory) -> Path:
    """A tiny pretrained character-level model whose vocabulary covers every task's prompt."""
    root = tmp_path_factory.mktemp("ft_base")
    (root / "corpus.txt").write_text(synthetic_text(1500) + (PROMPT_WORDS + "\n") * 50, encoding="utf-8")
    cli("preprocess", root / "corpus.txt", "--out", root / "data", "--model-type", "char")
    cli(
        "pretrain",
        Path(__file__).parents[1] / "recipes" / "tiny.toml",
        "--run-dir",
        root / "run",
        "--set",
        f"data.path={root / 'data'}",
        "--set",
        "train.steps=20",
        "--set",
        "model.max_seq_len=128",
        "--set",
        "checkpoint.every=20",
    )
    return root / "run"


def _squad(path: Path, paragraphs: list[tuple[str, list[tuple[str, str]]]]) -> Path:
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": ctx,
                        "qas": [
                            {"id": f"q{i}-{j}", "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}]}
                            for j, (q, a) in enumerate(qas)
                        ],
                    }
                    for i, (ctx, qas) in enumerate(paragraphs)
                ],
            }
        ],
    }
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _task_files(tmp: Path) -> dict[str, list[str]]:
    _squad(
        tmp / "qa.json",
        [
            (f"the {c} fox sees the owl in the garden.", [("where is the owl?", "garden")])
            for c in ("red", "blue", "green", "brown", "black", "white")
        ],
    )
    _squad(
        tmp / "cmrc.json",
        [
            ("北京是中国的首都。长城在北方。", [("中国的首都是哪里？", "北京")]),
            ("李白写诗。长城在北方。", [("谁写诗？", "李白")]),
        ]
        * 3,
    )
    (tmp / "cls.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"the film was {w}\t{l}\n" for w, l in [("great", 1), ("bad", 0)] * 6)
    )
    (tmp / "sum.jsonl").write_text(
        "".join(
            json.dumps({"document": f"the {c} fox sees the owl. it is late.", "summary": f"{c} fox"}) + "\n"
            for c in ("red", "blue", "green", "brown", "black", "white")
        )
    )
    (tmp / "en.txt").write_text("the dog runs.\nthe cat runs.\n" * 4)
    (tmp / "de.txt").write_text("Der Hund läuft.\nDie Katze läuft.\n" * 4)
    (tmp / "alpaca.json").write_text(
        json.dumps([{"instruction": "count to three", "input": "", "output": "one two three."}] * 8)
    )
    return {
        "qa": ["--data", tmp / "qa.json"],
        "qa_zh": ["--data", tmp / "cmrc.json"],
        "classify": [
            "--data",
            tmp / "cls.tsv",
            "--set",
            "task.text_field=sentence",
            "--set",
            "task.label_names=0:negative,1:positive",
        ],
        "summarize": ["--data", tmp / "sum.jsonl"],
        "translate": ["--data", tmp / "en.txt", "--data2", tmp / "de.txt"],
        "instruct": ["--data", tmp / "alpaca.json"],
    }


EXPECTED = {
    "qa": "f1",
    "qa_zh": "f1",
    "classify": "accuracy",
    "summarize": "rouge1",
    "translate": "bleu",
    "instruct": "perplexity",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_task_finetunes_and_evaluates(cli, base_model, tmp_path, case):
    task = case.split("_")[0]
    args = _task_files(tmp_path)[case]
    run = tmp_path / "run"
    out = cli(
        "finetune",
        "--task",
        task,
        "--init-from",
        base_model,
        *args,
        "--run-dir",
        run,
        "--set",
        "train.steps=4",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.eval_every=4",
        "--set",
        "task.max_target_tokens=24",
    ).stdout
    assert "trainable_params: " in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["loss"]) and "val_loss" in rows[-1]
    data_args = [a for a in args if not str(a).startswith(("task.", "--set"))]
    metrics = json.loads(cli("evaluate", run, "--task", task, *data_args, "--json").stdout.strip().splitlines()[-1])
    assert EXPECTED[case] in metrics and metrics["total"] > 0
    if task != "instruct":
        preds = (run / f"eval-{task}" / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == metrics["total"] or task == "qa"
    if case == "classify":
        assert {json.loads(p)["prediction"] for p in preds} <= {"negative", "positive"}

    # The run, its export and its Hugging Face export carry the task (options, labels, length, chat format):
    # all three give the same predictions and metrics with no --set repeated.
    for fmt in ("bigmodel", "hf"):
        exported = tmp_path / f"export-{fmt}"
        cli("export", run, "--out", exported, "--format", fmt)
        model = exported if fmt == "bigmodel" else f"hf:{exported}"
        again = json.loads(cli("evaluate", model, "--task", task, *data_args, "--json").stdout.strip().splitlines()[-1])
        assert again == metrics, fmt
        if task != "instruct":
            assert (exported / f"eval-{task}" / "predictions.jsonl").read_text().splitlines() == preds, fmt
    if task == "instruct":
        # transformers renders and encodes a chat to the ids bigmodel trained on and chats with: EOS first.
        tokenizer_config = json.loads((tmp_path / "export-hf" / "tokenizer_config.json").read_text())
        assert tokenizer_config["chat_template"] == EXPORTED_CHAT_TEMPLATE
        transformers = pytest.importorskip("transformers")
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export-hf")
        chat = [{"role": "user", "content": "count to three"}, {"role": "assistant", "content": "one two three."}]
        ours = modelio.load(run).tokenizer("test")
        for messages, prompt in ((chat[:1], True), (chat, False)):
            expected = [ours.eos_id] + ours.encode([ChatFormat(CHAT_TEMPLATE).render(messages, prompt)])[0]
            assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                                    return_dict=False) == expected  # fmt: skip
        gguf = pytest.importorskip("gguf")
        cli("export", run, "--format", "gguf", "--out", tmp_path / "chat.gguf")  # llama.cpp reads it as the token
        reader = gguf.GGUFReader(tmp_path / "chat.gguf")
        assert reader.fields["tokenizer.chat_template"].contents() == EXPORTED_CHAT_TEMPLATE
        # generate answers an instruct model's prompt as a chat turn and stops at the end of its reply
        reply = cli("generate", run, "--prompt", "count to three", "--max-new-tokens", "40", "--temperature", "0")
        raw = cli(
            "generate", run, "--prompt", "count to three", "--max-new-tokens", "40", "--temperature", "0", "--raw"
        )
        assert raw.stdout.startswith("count to three") and not reply.stdout.startswith("count to three")
        assert END_OF_TURN not in reply.stdout


def test_show_examples_marks_trained_tokens(cli, base_model, tmp_path):
    args = _task_files(tmp_path)["classify"]
    out = cli("finetune", "--task", "classify", "--init-from", base_model, *args, "--show-examples", "2").stdout
    assert out.count("--- example") == 2
    assert out.count("Label:⟦ positiv") + out.count("Label:⟦ negativ") == 2  # only the label is trained on
    assert not (Path.cwd() / "runs" / "finetune-classify").exists()


AG_NEWS = [
    ("3", "Wall St. Bears Claw Back", "Short-sellers are seeing green again."),
    ("4", "New chip", "The chip doubles the speed."),
    ("1", "Talks resume", "Diplomats met again on Monday."),
    ("2", "Late goal", "The home side won the cup."),
] * 3


def _ag_news_csv(path: Path, empty_row: int | None = None) -> Path:
    """AG News' shape: quoted label,title,text rows and no header row (one text emptied on request)."""
    rows = [(lab, title, "" if i == empty_row else text) for i, (lab, title, text) in enumerate(AG_NEWS)]
    path.write_text("".join(",".join(f'"{cell}"' for cell in row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_classify_label_sets_come_from_the_training_file(tmp_path):
    """The shipped classify recipe names no labels: AG News' integers and a JSONL's words are both inferred."""
    recipe = finetune.default_recipe("classify")

    def load(path: Path, *sets: str) -> dict:
        sets = ("finetune.task=classify", f"finetune.train_file={path}", *sets)
        cfg = config.load_config(recipe, list(sets), cls=finetune.FinetuneConfig)
        assert cfg.task.label_names == ""
        return finetune._examples(cfg)[2]

    tsv = tmp_path / "ag_news_train.tsv"
    tsv.write_text("".join("\t".join(row) + "\n" for row in AG_NEWS), encoding="utf-8")
    assert load(tsv, "task.columns=label,title,text")["labels"] == ["1", "2", "3", "4"]
    words = ["world", "sports", "business", "sports"] * 3
    jsonl = tmp_path / "news.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"story {i}", "label": w}) + "\n" for i, w in enumerate(words)))
    assert load(jsonl)["labels"] == ["business", "sports", "world"]


def test_headerless_file_error_columns_and_warnings_that_name_the_file(cli, base_model, tmp_path):
    data = _ag_news_csv(tmp_path / "ag_news.csv", empty_row=3)
    args = ["finetune", "--task", "classify", "--init-from", base_model, "--data", data, "--show-examples", "1"]
    refused = cli(*args, ok=False)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "seems to have no header row" in refused.stderr and "--columns label,col2,text" in refused.stderr
    out = cli(*args, "--set", "task.columns=label,title,text", "--set", "task.max_target_tokens=1").stdout
    assert f"warning: {data}: skipped 1 rows with an empty text (lines: 4)" in out
    assert f"warning: {data}: 10 targets cut to task.max_target_tokens=1" in out  # " 3" is two characters
    assert f"warning: {data} (validation share): 1 targets cut" in out
    assert "Text: Short-sellers are seeing green again.\nLabel:⟦" in out


@pytest.mark.slow
def test_lora_trains_adapters_only_and_merges_on_export(cli, base_model, tmp_path):
    run = tmp_path / "lora"
    args = _task_files(tmp_path)["summarize"]
    out = cli(
        "finetune",
        "--task",
        "summarize",
        "--init-from",
        base_model,
        *args,
        "--run-dir",
        run,
        "--set",
        "train.steps=6",
        "--set",
        "lora.rank=4",
        "--set",
        "lora.targets=all",
        "--set",
        "optim.lr=1e-2",
    ).stdout
    d, f, layers = 128, 512, 2
    kv = 2 * 32  # tiny preset: 2 kv heads of 32 dims
    per_layer = 4 * ((d + d) + (d + kv) * 2 + (d + d)) + 4 * ((d + f) * 2 + (f + d))
    assert f"trainable_params: {per_layer * layers}" in out
    meta = json.loads((run / "checkpoints" / "6" / "params" / "_METADATA").read_text())
    assert all("_lora_" in key for key in json.dumps(meta["tree_metadata"]).split('"') if key.endswith("proj"))

    cli("export", run, "--out", tmp_path / "merged")
    with_adapter = modelio.load(run)
    merged = modelio.load(tmp_path / "merged")
    assert merged.lora is None and with_adapter.lora is not None
    tokens = np.random.default_rng(0).integers(0, merged.model_cfg.vocab_size, (2, 32)).astype(np.int32)
    a = nnx.merge(with_adapter.graphdef, with_adapter.params)(tokens)
    b = nnx.merge(merged.graphdef, merged.params)(tokens)
    base = modelio.load(base_model)
    c = nnx.merge(base.graphdef, base.params)(tokens)
    assert float(jax.numpy.abs(a - b).max()) < 1e-4
    assert float(jax.numpy.abs(a - c).max()) > 1e-3  # the adapters did change the model

    # A LoRA run is a starting point like any other: finetuning again starts from its merged weights.
    again = cli(
        "finetune",
        "--task",
        "summarize",
        "--init-from",
        run,
        *args,
        "--run-dir",
        tmp_path / "again",
        "--set",
        "train.steps=1",
    ).stdout
    assert "step: 1" in again


@pytest.mark.slow
def test_lora_model_exports_to_hugging_face_with_merged_weights(cli, base_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    cli(
        "finetune",
        "--task",
        "summarize",
        "--init-from",
        base_model,
        *_task_files(tmp_path)["summarize"],
        "--run-dir",
        run,
        "--set",
        "train.steps=4",
        "--set",
        "lora.rank=2",
        "--set",
        "optim.lr=1e-2",
    )
    cli("export", run, "--format", "hf", "--out", tmp_path / "hf")
    ours = modelio.load(run)
    tokens = np.random.default_rng(1).integers(0, ours.model_cfg.vocab_size, (2, 24)).astype(np.int32)
    expected = np.asarray(nnx.merge(ours.graphdef, ours.params)(tokens))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - expected).max() < 1e-4


def test_a_lora_runs_mfu_counts_the_flops_it_runs_as_plan_does(cli, base_model, tmp_path):
    """A frozen weight gets no weight gradient: a LoRA step runs 2 FLOPs per weight fewer than full finetuning,
    plus 6 per adapter weight. Its logged MFU counted full finetuning's FLOPs, over plan's figure."""
    from bigmodel_cli.model.sizing import flops_per_token, train_flops_per_token

    args = (*_task_files(tmp_path)["classify"], "--set", "train.steps=2", "--set", "train.log_every=1")
    per_token_over_peak, adapters = {}, 0
    for name, extra in (("full", ()), ("lora", ("--set", "lora.rank=4"))):
        out = cli(
            "finetune", "--task", "classify", "--init-from", base_model, *args, *extra, "--run-dir", tmp_path / name
        )
        adapters = int(out.stdout.split("trainable_params: ")[1].split()[0].replace(",", "")) if extra else adapters
        row = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][-1]
        per_token_over_peak[name] = row["mfu"] / row["tokens_per_s"]  # the same peak divides both
    loaded = modelio.load(tmp_path / "full")
    expected = train_flops_per_token(loaded.model_cfg, loaded.seq_len, adapters) / flops_per_token(
        loaded.model_cfg, loaded.seq_len
    )
    assert adapters > 0 and per_token_over_peak["lora"] / per_token_over_peak["full"] == pytest.approx(expected)
    assert expected < 0.9


def test_a_lora_run_refuses_to_resume_on_a_base_whose_weights_changed(cli, base_model, tmp_path):
    """A LoRA run reopens its base by path on every resume. Trained on further (or replaced) in between, the base
    gave other losses from the resumed step on, without a word; now the resume is refused in one line."""
    from safetensors.numpy import load_file, save_file

    base = tmp_path / "base"
    cli("export", base_model, "--out", base)
    args = ("--task", "classify", "--init-from", base, *_task_files(tmp_path)["classify"], "--run-dir", tmp_path / "r")
    cli("finetune", *args, "--set", "lora.rank=4", "--set", "train.steps=2", "--set", "checkpoint.every=2")
    weights = load_file(base / "model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 1e-3}, base / "model.safetensors")
    more = ("--set", "lora.rank=4", "--set", "train.steps=4", "--set", "checkpoint.every=2", "--allow-config-change")
    refused = cli("finetune", *args, *more, ok=False)
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'r'}: the starting model (finetune.init_from) changed since step 2 was saved (its "
        "weights differ): restore it, or finetune from it into a new --run-dir"
    ]
    generated = cli("generate", tmp_path / "r", "--prompt", "the", "--max-new-tokens", "2", ok=False)
    assert generated.exit_code == 2 and "changed since its adapters were trained" in generated.stderr
    save_file(weights, base / "model.safetensors")  # restored: the run resumes
    assert "resumed from step 2" in cli("finetune", *args, *more).stdout
