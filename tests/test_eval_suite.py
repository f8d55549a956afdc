"""`bigmodel evaluate MODEL --suite suite.toml`: several tasks of one model, one table, one suite.json, and a
section of `report`'s HTML; each task scores exactly what `evaluate` gives for it alone."""

import json
import tomllib

import pytest

from tests.conftest import REPO, pretrain_args, synthetic_text

SUITE = """# three kinds on the tiny fixtures; paths relative to this file
[[task]]
name = "squad-dev"
kind = "qa"
data = "squad.json"
max_examples = 2
set = ["task.max_target_tokens=8"]  # the tiny model's 64 positions hold a prompt and 8 answer tokens

[[task]]
name = "news"
kind = "classify"
data = "news.tsv"
columns = "label,text"
batch_size = 4

[[task]]
name = "held-out"
kind = "perplexity"
text = "held_out.txt"

[[task]]
name = "arc-like"
kind = "choice"
data = "choice.jsonl"
num_fewshot = 1
"""


@pytest.fixture(scope="module")
def world(cli, tiny_data, tmp_path_factory) -> dict:
    """A tiny pretrained run, a suite of qa + classify + perplexity beside its files, and the suite run on it."""
    root = tmp_path_factory.mktemp("suite")
    run = root / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 2, "checkpoint.every": 2}))
    files = root / "files"
    files.mkdir()
    qas = [
        {"id": "a", "question": "who sleeps?", "answers": [{"text": "the cat", "answer_start": 0}]},
        {"id": "b", "question": "who runs?", "answers": [{"text": "the dog", "answer_start": 16}]},
        {"id": "c", "question": "what?", "answers": [{"text": "sleeps", "answer_start": 8}]},
    ]
    squad = {"data": [{"paragraphs": [{"context": "the cat sleeps, the dog runs.", "qas": qas}]}]}
    (files / "squad.json").write_text(json.dumps(squad))
    (files / "news.tsv").write_text("world\tWall St. Bears Claw Back\ntech\tNew chip is fast\nworld\tOil prices rise\n")
    (files / "held_out.txt").write_text(synthetic_text(20, seed=7))
    choice = [
        {"prompt": f"the cat {verb}", "choices": ["sleeps", "runs", "eats"], "answer": i % 3}
        for i, verb in enumerate(["is", "was", "will", "can"])
    ]
    (files / "choice.jsonl").write_text("".join(json.dumps(row) + "\n" for row in choice))
    (files / "suite.toml").write_text(SUITE)
    result = json.loads(cli("evaluate", run, "--suite", files / "suite.toml", "--json").stdout.splitlines()[-1])
    return {"root": root, "run": run, "files": files, "result": result}


def _alone(cli, *args) -> dict:
    return json.loads(cli("evaluate", *args, "--json").stdout.splitlines()[-1])


def test_each_task_scores_what_evaluate_gives_it_alone(cli, world):
    run, files, rows = world["run"], world["files"], {row["name"]: row for row in world["result"]["tasks"]}
    assert list(rows) == ["squad-dev", "news", "held-out", "arc-like"]
    qa = _alone(
        cli,
        run,
        "--task",
        "qa",
        "--data",
        files / "squad.json",
        "--max-examples",
        "2",
        "--set",
        "task.max_target_tokens=8",
    )
    news = _alone(
        cli, run, "--task", "classify", "--data", files / "news.tsv", "--columns", "label,text", "--batch-size", "4"
    )
    text = _alone(cli, run, "--text", files / "held_out.txt")
    choice = _alone(cli, run, "--task", "choice", "--data", files / "choice.jsonl", "--num-fewshot", "1")
    assert rows["squad-dev"]["metrics"] == qa and rows["news"]["metrics"] == news
    assert rows["held-out"]["metrics"] == text
    assert {k: v for k, v in rows["arc-like"]["metrics"].items() if k != "data"} == {
        k: v for k, v in choice.items() if k != "data"
    }
    assert rows["arc-like"]["n"] == 4  # the few-shot settings beside the scores are not scores
    assert set(rows["arc-like"]["scores"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(rows["squad-dev"]["scores"]) >= {"exact_match", "f1"} and rows["squad-dev"]["n"] == 2
    assert rows["news"]["scores"] == {"accuracy": news["accuracy"], "macro_f1": news["macro_f1"]}
    assert rows["held-out"]["scores"] == {k: text[k] for k in ("loss", "perplexity", "bits_per_byte")}
    assert rows["held-out"]["n"] == text["tokens"] and all(row["seconds"] > 0 for row in rows.values())


def test_suite_json_and_each_tasks_outputs_land_in_the_runs_evaluation_folder(world):
    out = world["run"] / "eval-suite-suite"  # RUN/eval-suite-NAME, NAME the suite file's stem
    assert json.loads((out / "suite.json").read_text()) == world["result"]
    assert {p.name for p in out.iterdir()} == {"suite.json", "squad-dev", "news", "held-out", "arc-like"}
    assert {p.name for p in (out / "squad-dev").iterdir()} == {"metrics.json", "predictions.jsonl"}
    assert json.loads((out / "held-out" / "metrics.json").read_text()) == world["result"]["tasks"][2]["metrics"]


def test_the_table_prints_and_reports_html_shows_the_suite(cli, world, tmp_path):
    text = cli("evaluate", world["run"], "--suite", world["files"] / "suite.toml", "--out", tmp_path / "s").stdout
    for word in ("task", "kind", "metric", "value", "seconds", "squad-dev", "exact_match / f1", "held-out"):
        assert word in text
    assert (tmp_path / "s" / "news" / "metrics.json").is_file() and (tmp_path / "s" / "suite.json").is_file()
    cli("report", world["run"], "--out", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "Evaluation suite run: suite.toml" in page and "<td>news</td><td>classify</td>" in page


def _refused(cli, world, suite_text: str, *extra) -> str:
    (world["files"] / "bad.toml").write_text(suite_text)
    result = cli("evaluate", world["run"], "--suite", world["files"] / "bad.toml", *extra, ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unknown_keys_and_bad_tasks_stop_in_one_line_naming_the_task(cli, world):
    assert "task 'news': unknown key task.max_exmaples (did you mean 'max_examples'?)" in _refused(
        cli, world, SUITE.replace("batch_size = 4", "max_exmaples = 4")
    )
    assert "unknown top-level key 'model'" in _refused(cli, world, 'model = "x"\n' + SUITE)
    assert "task 'news': kind 'clasify' is unknown (did you mean 'classify'?)" in _refused(
        cli, world, SUITE.replace('kind = "classify"', 'kind = "clasify"')
    )
    assert "task 'arc-like': metric does nothing for kind choice" in _refused(cli, world, SUITE + 'metric = "squad"\n')
    missing = _refused(cli, world, SUITE.replace("news.tsv", "absent.tsv"))
    assert "task 'news': data" in missing and "absent.tsv does not exist" in missing
    # found only when the task runs: a headerless TSV without its columns
    runtime = _refused(cli, world, SUITE.replace('columns = "label,text"\n', ""))
    assert runtime.startswith("error: suite task 'news' (classify): ") and "--columns" in runtime
    assert "two tasks are named 'news'" in _refused(cli, world, SUITE + SUITE[SUITE.index('[[task]]\nname = "news"') :])
    assert "--max-examples does nothing with --suite" in _refused(cli, world, SUITE, "--max-examples", "2")


def test_the_example_suites_parse_against_the_layout_they_name(tmp_path):
    from bigmodel_cli.evaluate import suite

    examples = sorted((REPO / "recipes" / "eval").glob("*.toml"))
    assert {p.name for p in examples} >= {"chinese.toml", "english.toml"}
    for path in examples:
        assert path.read_text().startswith("#"), "an example suite begins with a comment: the command, its data"
        for table in tomllib.loads(path.read_text())["task"]:  # the data root they expect, with empty files
            for key in ("data", "data2", "text", "fewshot_data"):
                if key in table:
                    (tmp_path / table[key]).parent.mkdir(parents=True, exist_ok=True)
                    (tmp_path / table[key]).touch()
        parsed = suite.load(path, tmp_path)
        assert all(task.data or task.text for task in parsed.tasks)
        assert {task.kind for task in parsed.tasks} >= {"qa", "choice", "perplexity"}
