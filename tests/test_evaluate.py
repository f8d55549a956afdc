"""`bigmodel evaluate`: every option takes effect or is refused; whole text files give perplexity and bits/byte."""

import json
import math
from pathlib import Path

import pytest
import typer

from bigmodel_cli.data.tokenizer import Tokenizer
from tests.conftest import pretrain_args, synthetic_text


@pytest.fixture(scope="module")
def world(cli, tiny_data, tmp_path_factory) -> dict:
    """A tiny pretrained run plus task files and predictions that need no model to score."""
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 4, "checkpoint.every": 4}))
    (root / "held_out.txt").write_text(synthetic_text(40, seed=7), encoding="utf-8")
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "北京是中国的首都，有２１个区。",
                        "qas": [
                            {"id": "a", "question": "首都？", "answers": [{"text": "北京", "answer_start": 0}]},
                            # a wrong answer_start: still scored
                            {"id": "b", "question": "几个区？", "answers": [{"text": "２１", "answer_start": 0}]},
                            {"id": "c", "question": "哪国？", "answers": [{"text": "中国", "answer_start": 3}]},
                        ],
                    }
                ]
            }
        ]
    }
    (root / "cmrc.json").write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    (root / "cmrc_preds.json").write_text(json.dumps({"a": "北京", "b": "21", "c": "中国"}, ensure_ascii=False))
    (root / "zh.jsonl").write_text(
        "".join(
            json.dumps({"id": str(i), "source": "the cat sleeps", "target": t}, ensure_ascii=False) + "\n"
            for i, t in enumerate(["猫在睡觉。", "狗在跑步。", "我们去北京。"])
        ),
        encoding="utf-8",
    )
    (root / "zh_preds.jsonl").write_text(
        "".join(
            json.dumps({"id": str(i), "prediction": p}, ensure_ascii=False) + "\n"
            for i, p in enumerate(["猫在睡觉。", "狗在跑。", "我们去上海。"])
        ),
        encoding="utf-8",
    )
    (root / "en.txt").write_text("the cat sleeps\nthe dog runs\n")
    (root / "de.txt").write_text("die Katze schläft\nder Hund läuft\n")
    (root / "de_preds.jsonl").write_text(
        '{"id": "1", "prediction": "die Katze schläft"}\n{"id": "2", "prediction": "der Hund"}\n'
    )
    (root / "agnews.tsv").write_text("3\tWall St. Bears Claw Back\n4\tNew chip is fast\n3\tOil prices rise\n")
    (root / "agnews_preds.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "prediction": p}) + "\n" for i, p in enumerate(["3", "3", "3"], start=1))
    )
    return {"root": root, "run": run, "data": tiny_data}


def _json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def _refused(cli, *args, mentions: str) -> None:
    result = cli(*args, ok=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and mentions in lines[0] and "Traceback" not in result.output, result.stderr


def _qa(w, *extra):
    r = w["root"]
    return ["evaluate", "--task", "qa", "--data", r / "cmrc.json", "--predictions", r / "cmrc_preds.json", *extra]


# For every option of `evaluate`: a check that it changes the result, or that it is refused where it can't.
def _model(cli, w):
    _refused(cli, "evaluate", mentions="MODEL")
    assert _json(cli("evaluate", w["run"], "--json"))["step"] == 4


def _data(cli, w):
    assert _json(cli("evaluate", w["run"], "--data", w["data"], "--json"))["data"] == str(w["data"])
    _refused(cli, "evaluate", w["run"], "--data", w["data"], "--text", w["root"] / "held_out.txt", mentions="--data")


def _text(cli, w):
    metrics = _json(cli("evaluate", w["run"], "--text", w["root"] / "held_out.txt", "--json"))
    assert {"bits_per_byte", "bytes"} <= set(metrics)
    _refused(cli, *_qa(w, "--text", w["root"] / "held_out.txt"), mentions="--text")


def _task(cli, w):
    assert _json(cli(*_qa(w, "--json")))["task"] == "qa"
    _refused(cli, "evaluate", w["run"], "--task", "poetry", "--data", w["root"] / "cmrc.json", mentions="poetry")


def _data2(cli, w):
    r = w["root"]
    args = ["--task", "translate", "--data", r / "en.txt", "--predictions", r / "de_preds.jsonl", "--json"]
    assert _json(cli("evaluate", *args, "--data2", r / "de.txt"))["total"] == 2
    _refused(cli, "evaluate", *args, mentions="second path")
    _refused(cli, "evaluate", w["run"], "--data2", r / "de.txt", mentions="--data2")


def _predictions(cli, w):
    assert _json(cli(*_qa(w, "--json")))["total"] == 3
    _refused(cli, "evaluate", w["run"], "--predictions", w["root"] / "cmrc_preds.json", mentions="--predictions")


def _metric(cli, w):
    auto = _json(cli(*_qa(w, "--json")))
    squad = _json(cli(*_qa(w, "--metric", "squad", "--json")))
    assert auto["metric"] == "cmrc2018" and squad["metric"] == "squad"
    _refused(cli, *_qa(w, "--metric", "bleu"), mentions="--metric")
    _refused(cli, "evaluate", w["run"], "--metric", "squad", mentions="--metric")


def _columns(cli, w):
    r = w["root"]
    args = ["evaluate", "--task", "classify", "--data", r / "agnews.tsv", "--predictions", r / "agnews_preds.jsonl"]
    metrics = _json(cli(*args, "--columns", "label,text", "--json"))
    assert metrics["total"] == 3 and metrics["accuracy"] == pytest.approx(200 / 3)
    headerless = cli(*args, ok=False)
    assert headerless.exit_code == 2 and "--columns" in headerless.stderr
    _refused(cli, "evaluate", w["run"], "--columns", "label,text", mentions="--columns")
    jsonl = ["evaluate", "--task", "translate", "--data", r / "zh.jsonl", "--predictions", r / "zh_preds.jsonl"]
    _refused(cli, *jsonl, "--columns", "source,target", mentions="--columns")  # JSONL names its fields


def _out(cli, w, tmp_path):
    cli(*_qa(w, "--out", tmp_path / "qa_out"))
    assert {p.name for p in (tmp_path / "qa_out").iterdir()} == {"metrics.json", "predictions.jsonl"}
    cli("evaluate", w["run"], "--out", tmp_path / "lm_out")
    assert json.loads((tmp_path / "lm_out" / "metrics.json").read_text())["step"] == 4


def _set(cli, w):
    r = w["root"]
    args = ["evaluate", "--task", "translate", "--data", r / "en.txt", "--data2", r / "de.txt"]
    args += ["--predictions", r / "de_preds.jsonl"]
    japanese = _json(cli(*args, "--set", "task.target_lang=Japanese", "--json"))
    german = _json(cli(*args, "--json"))
    assert "tok:char" in japanese["bleu_signature"] and "tok:13a" in german["bleu_signature"]
    _refused(cli, *args, "--set", "task.target_langg=Chinese", mentions="target_lang")
    _refused(cli, "evaluate", w["run"], "--set", "data.seq_len=256", mentions="--set")


def test_bleu_tokenizer_follows_the_target_language(cli, world):
    r = world["root"]
    args = ["evaluate", "--task", "translate", "--data", r / "zh.jsonl", "--predictions", r / "zh_preds.jsonl"]
    named = _json(cli(*args, "--set", "task.target_lang=Chinese", "--json"))
    default = _json(cli(*args, "--json"))  # "German" by default: the Chinese references decide
    assert "tok:zh" in named["bleu_signature"] and default["bleu"] == named["bleu"]
    import sacrebleu

    hyps = ["猫在睡觉。", "狗在跑。", "我们去上海。"]
    refs = ["猫在睡觉。", "狗在跑步。", "我们去北京。"]
    assert named["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)


def _split(cli, w):
    val = _json(cli("evaluate", w["run"], "--split", "val", "--max-batches", "1", "--json"))
    train = _json(cli("evaluate", w["run"], "--split", "train", "--max-batches", "1", "--json"))
    assert val["split"] == "val" and train["split"] == "train" and val["loss"] != train["loss"]
    _refused(cli, *_qa(w, "--split", "train"), mentions="--split")


def _batch_size(cli, w):
    small = _json(cli("evaluate", w["run"], "--batch-size", "8", "--max-batches", "1", "--json"))
    large = _json(cli("evaluate", w["run"], "--batch-size", "16", "--max-batches", "1", "--json"))
    assert large["tokens"] == 2 * small["tokens"]
    _refused(cli, *_qa(w, "--batch-size", "4"), mentions="--batch-size")
    _refused(cli, "evaluate", w["run"], "--batch-size", "0", mentions="--batch-size")


def _quantize(cli, w):
    # The int8 model is another model: its loss moves (tests/test_quantize.py bounds by how much).
    plain = _json(cli("evaluate", w["run"], "--max-batches", "1", "--json"))
    int8 = _json(cli("evaluate", w["run"], "--max-batches", "1", "--quantize", "int8", "--json"))
    assert int8["tokens"] == plain["tokens"] and int8["loss"] != plain["loss"]
    _refused(cli, *_qa(w, "--quantize", "int8"), mentions="--quantize")
    _refused(cli, "evaluate", w["run"], "--quantize", "int4", mentions="--quantize")


def _max_batches(cli, w):
    one = _json(cli("evaluate", w["run"], "--max-batches", "1", "--json"))
    every = _json(cli("evaluate", w["run"], "--max-batches", "0", "--json"))
    assert every["tokens"] > one["tokens"]
    _refused(cli, *_qa(w, "--max-batches", "1"), mentions="--max-batches")


def _max_examples(cli, w):
    two = _json(cli(*_qa(w, "--max-examples", "2", "--json")))
    assert two["total"] == 2
    _refused(cli, "evaluate", w["run"], "--max-examples", "2", mentions="--max-examples")


def _choice(cli, w, *extra) -> list:
    """The loglikelihoods of --task choice on a small plain file (cached per arguments)."""
    cache = w.setdefault("choice", {})
    if extra not in cache:
        r = w["root"]
        if not (r / "choice.jsonl").exists():
            rows = [{"prompt": f"the cat {i}:", "choices": ["sat", "ran"], "answer": i % 2} for i in range(6)]
            (r / "choice.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            (r / "shots.jsonl").write_text(json.dumps({"prompt": "a dog:", "choices": ["is"], "answer": 0}) + "\n")
        out = r / f"choice-{len(cache)}"
        cli("evaluate", w["run"], "--task", "choice", "--data", r / "choice.jsonl", "--out", out, *extra)
        lines = (out / "predictions.jsonl").read_text().splitlines()
        cache[extra] = [json.loads(line)["loglikelihoods"] for line in lines]
    return cache[extra]


def _num_fewshot(cli, w):
    assert _choice(cli, w) != _choice(cli, w, "--num-fewshot", "2")
    _refused(cli, *_qa(w, "--num-fewshot", "2"), mentions="--num-fewshot")


def _fewshot_seed(cli, w):
    assert _choice(cli, w, "--num-fewshot", "2") != _choice(cli, w, "--num-fewshot", "2", "--fewshot-seed", "7")
    _refused(cli, "evaluate", w["run"], "--fewshot-seed", "7", mentions="--fewshot-seed")


def _fewshot_data(cli, w):
    shots = ("--num-fewshot", "1", "--fewshot-data", str(w["root"] / "shots.jsonl"))
    assert _choice(cli, w, "--num-fewshot", "1") != _choice(cli, w, *shots)
    _refused(cli, *_qa(w, "--fewshot-data", w["root"] / "shots.jsonl"), mentions="--fewshot-data")


def _ref(cli, w):
    pairs = w["root"] / "pairs.jsonl"
    rows = [{"prompt": f"the cat {i}", "chosen": " sat", "rejected": " ran away"} for i in range(3)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ("evaluate", w["run"], "--task", "preference", "--data", pairs)
    _refused(cli, *args, mentions="--ref")  # a pretraining run records no starting model to compare with
    against_itself = _json(cli(*args, "--ref", w["run"], "--json"))
    assert against_itself["pairs"] == 3 and against_itself["reward_accuracy"] == 0.5
    assert against_itself["reward_margin"] == 0
    _refused(cli, *_qa(w, "--ref", w["run"]), mentions="--ref")


def _json_out(cli, w):
    plain = cli("evaluate", w["run"]).stdout
    assert "loss: " in plain and _json(cli("evaluate", w["run"], "--json"))["loss"] > 0


def _suite(cli, w):
    # suites run in tests/test_eval_suite.py; here: --suite runs one, and an option it would ignore is refused
    (w["root"] / "one.toml").write_text('[[task]]\nname = "text"\nkind = "perplexity"\ntext = "held_out.txt"\n')
    rows = _json(cli("evaluate", w["run"], "--suite", w["root"] / "one.toml", "--json"))["tasks"]
    assert rows[0]["metrics"]["bytes"] == len((w["root"] / "held_out.txt").read_bytes())
    _refused(cli, "evaluate", w["run"], "--suite", w["root"] / "one.toml", "--split", "val", mentions="--split")


def _multi_process(cli, w):
    # The multi-process options run a real 2-process evaluation in test_multiprocess.py; alone they are refused.
    _refused(cli, "evaluate", w["run"], "--num-processes", "2", mentions="--coordinator")


OPTION_CHECKS = {
    "model": _model,
    "data": _data,
    "text": _text,
    "task": _task,
    "ref": _ref,
    "data2": _data2,
    "predictions": _predictions,
    "metric": _metric,
    "columns": _columns,
    "out": _out,
    "overrides": _set,
    "split": _split,
    "batch_size": _batch_size,
    "max_batches": _max_batches,
    "max_examples": _max_examples,
    "num_fewshot": _num_fewshot,
    "fewshot_seed": _fewshot_seed,
    "fewshot_data": _fewshot_data,
    "json_out": _json_out,
    "suite": _suite,
    "quantize": _quantize,
    "coordinator": _multi_process,
    "num_processes": _multi_process,
    "process_id": _multi_process,
}


@pytest.mark.slow
def test_every_evaluate_option_takes_effect_or_is_refused(cli, world, tmp_path):
    from bigmodel_cli.cli import app

    command = typer.main.get_command(app).commands["evaluate"]
    assert {p.name for p in command.params} == set(OPTION_CHECKS), "a new evaluate option needs a check here"
    for check in dict.fromkeys(OPTION_CHECKS.values()):  # each check once
        if check is _out:
            check(cli, world, tmp_path)
        else:
            check(cli, world)


def test_qa_subset_divides_by_n_and_scores_every_question(cli, world):
    first = _json(cli(*_qa(world, "--max-examples", "1", "--json")))
    assert first["total"] == 1 and first["exact_match"] == 100.0
    whole = _json(cli(*_qa(world, "--json")))
    # "b" has a wrong answer_start and is still scored: "21" against "２１" is 0 under CMRC's rules.
    assert whole["total"] == 3 and whole["missing"] == 0
    assert whole["exact_match"] == pytest.approx(200 / 3)


@pytest.mark.slow
def test_text_scores_every_token_of_a_whole_file(cli, world):
    text_file = world["root"] / "held_out.txt"
    metrics = _json(cli("evaluate", world["run"], "--text", text_file, "--json"))
    text = text_file.read_text(encoding="utf-8")
    n_tokens = len(Tokenizer(world["run"] / "tokenizer.model").encode([text])[0])
    assert metrics["tokens"] == n_tokens  # every token predicted once (the first after end-of-document)
    assert metrics["bytes"] == len(text.encode("utf-8"))
    bits = metrics["loss"] * metrics["tokens"] / math.log(2) / metrics["bytes"]
    assert metrics["bits_per_byte"] == pytest.approx(bits, rel=1e-9)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-9)
    # The same text evaluated twice gives the same numbers; another batch size changes nothing but speed.
    again = _json(cli("evaluate", world["run"], "--text", text_file, "--batch-size", "16", "--json"))
    assert again["tokens"] == metrics["tokens"] and again["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_text_refuses_a_missing_or_undecodable_file(cli, world, tmp_path):
    _refused(cli, "evaluate", world["run"], "--text", tmp_path / "nope.txt", mentions="not found")
    Path(tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _refused(cli, "evaluate", world["run"], "--text", tmp_path / "latin1.txt", mentions="UTF-8")


def test_the_training_files_columns_do_not_carry_into_evaluation():
    from bigmodel_cli.evaluate import task_eval
    from bigmodel_cli.tasks import taskinfo
    from bigmodel_cli.tasks.options import TaskOptions

    info = taskinfo.TaskInfo(task="classify", options=TaskOptions(columns="label,body", text_field="body"))
    carried = task_eval.task_options("classify", info, [])
    assert carried.columns == "" and carried.text_field == "body"  # the prompt options do carry
    assert task_eval.task_options("classify", info, ["task.columns=label,body"]).columns == "label,body"


def test_predictions_files_score_alike_whatever_their_shape_and_name_what_they_lack(cli, world, tmp_path):
    """SQuAD's {id: answer}, JSONL lines (one or many) and the predictions.jsonl evaluate writes all score the same
    answers alike; questions sharing an id are refused, since predictions are matched by id; examples without a
    prediction are counted and named in a warning."""
    r = world["root"]
    qa = ["evaluate", "--task", "qa", "--data", r / "cmrc.json", "--json", "--predictions"]
    as_dict = _json(cli(*qa, r / "cmrc_preds.json", "--out", tmp_path / "dict"))
    answers = json.loads((r / "cmrc_preds.json").read_text())
    lines = "".join(json.dumps({"id": k, "prediction": v}, ensure_ascii=False) + "\n" for k, v in answers.items())
    for name in ("preds.jsonl", "preds.json"):  # by its name, or by holding more than one JSON value
        (tmp_path / name).write_text(lines, encoding="utf-8")
        assert _json(cli(*qa, tmp_path / name)) == as_dict
    assert _json(cli(*qa, tmp_path / "dict" / "predictions.jsonl")) == as_dict  # what evaluate wrote
    (tmp_path / "one.json").write_text(lines.splitlines()[0], encoding="utf-8")  # one JSONL line: only "a"
    one = cli(*qa, tmp_path / "one.json")
    assert _json(one)["missing"] == 2 and _json(one)["exact_match"] == pytest.approx(100 / 3)
    assert "2 of 3 examples have no prediction" in one.stderr

    squad = json.loads((r / "cmrc.json").read_text())
    squad["data"][0]["paragraphs"][0]["qas"][2]["id"] = "a"
    (tmp_path / "twice.json").write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    twice = ["evaluate", "--task", "qa", "--data", tmp_path / "twice.json", "--predictions", r / "cmrc_preds.json"]
    _refused(cli, *twice, mentions="questions 1 and 3 both have the id 'a'")

    classify = ["evaluate", "--task", "classify", "--data", r / "agnews.tsv", "--columns", "label,text", "--json"]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps({"id": i, "prediction": "3"}) + "\n" for i in "12"))
    scored = cli(*classify, "--predictions", tmp_path / "two.jsonl")
    assert _json(scored)["missing"] == 1 and _json(scored)["accuracy"] == pytest.approx(100 / 3)
    assert "1 of 3 examples have no prediction" in scored.stderr
