"""`bigmodel evaluate --task choice`: multiple-choice layouts, bad rows, and parity with lm-evaluation-harness."""

import csv
import json
import random
import shutil
import time
from pathlib import Path

import pytest

from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate import choice
from bigmodel_cli.tasks import choice_files
from tests.conftest import pretrain_args

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
ZH_TASK, HELLASWAG_TASK = "bigmodel_choice_zh", "bigmodel_choice_hellaswag"
SHOTS = (0, 2)

_ZH_SUBJECTS = ["首都", "河流", "山脉", "朝代", "诗人", "节日", "省份", "湖泊", "发明", "乐器", "菜系", "城市"]
_ZH_WORDS = ["北京", "长江", "泰山", "唐朝", "李白", "春节", "四川", "西湖", "造纸", "古筝", "川菜", "上海", "黄河"]
_EN_WORDS = "the cat dog sat ran on a mat and then it was very happy to see the big red ball".split()


def _write_zh_csv(path: Path, n: int, rng: random.Random) -> None:
    """A C-Eval-style CSV (id,question,A,B,C,D,answer) with Chinese text; one option holds a quoted comma."""
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for i in range(n):
            options = rng.sample(_ZH_WORDS, 4)
            if i == 3:
                options[1] = "黄河，长江"
            out.writerow([i, f"下列哪一个是中国著名的{_ZH_SUBJECTS[i % 12]}？", *options, "ABCD"[rng.randrange(4)]])


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_EN_WORDS) for _ in range(words))


def _hellaswag_row(rng: random.Random, i: int) -> dict:
    """A HellaSwag row as the Hugging Face dataset has it: ctx_a/ctx_b, string labels, WikiHow's [title] marks."""
    ctx_a = _sentence(rng, 6) + (" [title] the cat sat." if i % 3 == 0 else "")
    return {
        "ind": i,
        "activity_label": rng.choice(["Cats", "Playing ball", "Dogs"]),
        "ctx_a": ctx_a,
        "ctx_b": "The " + _sentence(rng, 2),
        "ctx": ctx_a,
        "endings": [_sentence(rng, rng.randint(2, 7)) + (" [step] and" if k == 1 else "") for k in range(4)],
        "label": str(rng.randrange(4)),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _harness(export: Path, tasks_dir: Path, shots: list[int]) -> dict:
    """lm-evaluation-harness's hf backend on the export, offline, with the local task YAMLs only (the harness's
    own thousands are not indexed); per-item samples, for each number of shots."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    model = HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=8)  # loaded once
    return {
        k: simple_evaluate(
            model=model,
            tasks=[ZH_TASK, HELLASWAG_TASK],
            num_fewshot=k,
            task_manager=tasks,
            log_samples=True,
            fewshot_random_seed=choice.DEFAULT_FEWSHOT_SEED,
        )
        for k in shots
    }


@pytest.fixture(scope="module")
def parity(cli, tiny_data, tmp_path_factory) -> dict:
    """A tiny model trained a few steps and exported to HF format; two local benchmark files; bigmodel's and
    the harness's results on them, 0-shot and 2-shot."""
    root = tmp_path_factory.mktemp("choice")
    started = time.perf_counter()
    # Weights spread wide (init_std 0.3) and 3 steps of training: answers that vary with the question and no
    # near-ties that float rounding could flip. 128 positions: the 2-shot prompts are cut from the left.
    settings = {"train.steps": 3, "checkpoint.every": 3, "model.max_seq_len": 128, "model.init_std": 0.3}
    cli(*pretrain_args(root / "run", tiny_data, settings))
    cli("export", root / "run", "--out", root / "hf", "--format", "hf")
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    _write_zh_csv(data / "zh.csv", 12, rng)
    _write_jsonl(data / "hellaswag.jsonl", [_hellaswag_row(rng, i) for i in range(12)])
    _write_jsonl(data / "hellaswag_shots.jsonl", [_hellaswag_row(rng, 100 + i) for i in range(4)])
    tasks_dir = root / "tasks"
    shutil.copytree(TASKS_DIR, tasks_dir)
    for yaml in tasks_dir.glob("*.yaml"):
        yaml.write_text(yaml.read_text(encoding="utf-8").replace("DATA_DIR", str(data)), encoding="utf-8")
    files = {
        ZH_TASK: (data / "zh.csv", None),
        HELLASWAG_TASK: (data / "hellaswag.jsonl", data / "hellaswag_shots.jsonl"),
    }
    ours: dict = {}
    for task, (path, shots_file) in files.items():
        for k in SHOTS:
            out = root / f"ours-{task}-{k}"
            args = ["evaluate", f"hf:{root / 'hf'}", "--task", "choice", "--data", path, "--out", out, "--json"]
            args += ["--num-fewshot", k, *(["--fewshot-data", shots_file] if shots_file else [])]
            metrics = json.loads(cli(*args).stdout.strip().splitlines()[-1])
            predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
            ours[task, k] = (metrics, predictions)
    ours_seconds = time.perf_counter() - started
    offline = pytest.MonkeyPatch()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        offline.setenv(name, "1")
    offline.chdir(root)  # where the harness may write its caches
    try:
        theirs = _harness(root / "hf", tasks_dir, SHOTS)
    finally:
        offline.undo()
    print(f"choice parity: bigmodel {ours_seconds:.1f} s, harness {time.perf_counter() - started - ours_seconds:.1f} s")
    return {"ours": ours, "theirs": theirs, "files": files}


@pytest.mark.parametrize("shots", SHOTS)
@pytest.mark.parametrize("task", [ZH_TASK, HELLASWAG_TASK])
def test_matches_lm_evaluation_harness(parity, task, shots):
    metrics, predictions = parity["ours"][task, shots]
    results = parity["theirs"][shots]
    reference = results["results"][task]
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert metrics["total"] == len(samples) == len(predictions) == 12
    assert len({p["chosen"] for p in predictions}) > 1, "a model that always picks one answer tests little"
    for name in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert metrics[name] == pytest.approx(reference[f"{name},none"], abs=1e-6), name
    # The same prompts, few-shot examples included, for every choice.
    path, shots_file = parity["files"][task]
    _, _, contexts = choice.load_items(path, shots_file, shots, None, 0, None)
    for context, sample, ours in zip(contexts, samples, predictions, strict=True):
        assert [list(a) for a in sample["arguments"]] == [[context, " " + c] for c in ours["choices"]]
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert ours["loglikelihoods"] == pytest.approx(theirs, abs=1e-3)
        lengths = [len(c) for c in ours["choices"]]
        assert ours["chosen"] == max(range(len(theirs)), key=lambda i: (theirs[i], -i))
        norm = [ll / n for ll, n in zip(theirs, lengths, strict=True)]
        assert ours["chosen_norm"] == max(range(len(norm)), key=lambda i: (norm[i], -i))
        assert (float(ours["chosen"] == ours["gold"]), float(ours["chosen_norm"] == ours["gold"])) == (
            sample["acc"],
            sample["acc_norm"],
        )
        assert ours["gold"] == sample["target"]


# --- layouts ----------------------------------------------------------------------------------------------


def test_detects_all_four_layouts_and_builds_the_harness_prompts(tmp_path):
    mmlu = tmp_path / "anatomy_test.csv"
    mmlu.write_text('What is 2+2?,3,4,"5, or 6",7,B\nThe sky is?,blue,red,green,black,A\n')
    layout, items, _ = choice_files.load(mmlu)
    assert layout == "mmlu" and [i.gold for i in items] == [1, 0]
    assert items[0].query == "What is 2+2?\nA. 3\nB. 4\nC. 5, or 6\nD. 7\nAnswer:"
    assert items[0].choices == ("A", "B", "C", "D")
    # The harness's mmlu_anatomy description opens every prompt; the subject comes from the file's name.
    assert items[0].description == "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert choice.load_items(mmlu, None, 0, None, 0, None)[2][0] == items[0].description + items[0].query

    hub = tmp_path / "mmlu.jsonl"  # cais/mmlu and ceval-exam rows exported from the Hub as JSON lines
    _write_jsonl(
        hub, [{"question": "2+2?", "subject": "high_school_math", "choices": ["3", "4", "5", "6"], "answer": 1}]
    )
    layout, items, _ = choice_files.load(hub)
    assert (layout, items[0].gold, items[0].query) == ("mmlu", 1, "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert "about high school math." in items[0].description
    _write_jsonl(hub, [{"id": 0, "question": "一加一？", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}])
    layout, items, cue = choice_files.load(hub)
    assert (layout, cue, items[0].gold, items[0].description) == ("mmlu", "答案：", 1, "")

    cmmlu = tmp_path / "cmmlu.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,天空是什么颜色？,蓝,红,绿,黑,A\n", encoding="utf-8")
    layout, items, cue = choice_files.load(cmmlu)
    assert (layout, cue) == ("mmlu", "答案：") and items[0].query.endswith("D. 黑\n答案：")

    arc = tmp_path / "arc.jsonl"
    row = {"question": "Which is a metal?", "choices": {"text": ["wood", "iron"], "label": ["1", "2"]}}
    _write_jsonl(arc, [{**row, "answerKey": "2"}])
    layout, items, _ = choice_files.load(arc)
    assert (layout, items[0].query, items[0].choices, items[0].gold) == (
        "arc",
        "Question: Which is a metal?\nAnswer:",
        ("wood", "iron"),
        1,
    )

    hellaswag = tmp_path / "hellaswag.jsonl"
    row = {"activity_label": "Cats", "ctx_a": "A cat sits. [title] Feed it.", "ctx_b": "THEN it", "label": "0"}
    _write_jsonl(hellaswag, [{**row, "endings": ["eats [step] food.", "sleeps."]}])
    layout, items, _ = choice_files.load(hellaswag)
    assert layout == "hellaswag" and items[0].query == "Cats: A cat sits.. Feed it. Then it"
    assert items[0].choices == ("eats food.", "sleeps.") and items[0].gold == 0

    plain = tmp_path / "plain.jsonl"
    _write_jsonl(
        plain,
        [
            {"prompt": "2+2=", "choices": ["3", "4"], "answer": 1},
            {"prompt": "Sky:", "choices": ["blue", "red"], "answer": "blue"},
            {"prompt": "Pick:", "choices": ["x", "y", "z"], "answer": "C"},
        ],
    )
    layout, items, _ = choice_files.load(plain)
    assert layout == "plain" and [i.gold for i in items] == [1, 0, 2] and items[0].query == "2+2="


def test_few_shot_examples_are_joined_and_drawn_the_harness_way(tmp_path):
    plain = tmp_path / "plain.jsonl"
    _write_jsonl(plain, [{"prompt": f"Q{i}:", "choices": ["no", "yes"], "answer": i % 2} for i in range(6)])
    _, items, contexts = choice.load_items(plain, None, 2, 1234, 0, None)
    rng = random.Random(1234)
    for item, context in zip(items, contexts, strict=True):
        shots = [s for s in rng.sample(items, 3) if s.record != item.record][:2]
        assert context == "".join(f"{s.query} {s.choices[s.gold]}\n\n" for s in shots) + item.query
        assert item.query not in context[: -len(item.query)]  # never the item itself
    _, _, other_seed = choice.load_items(plain, None, 2, 7, 0, None)
    assert other_seed != contexts
    _, subset, _ = choice.load_items(plain, None, 2, 1234, 2, None)
    assert len(subset) == 2


def test_mmlu_layout_takes_the_first_shots_like_the_harness(tmp_path):
    mmlu = tmp_path / "questions.csv"  # no subject in the name: no description
    mmlu.write_text("".join(f"Q{i}?,a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(4)))
    _, items, contexts = choice.load_items(mmlu, None, 2, None, 0, None)
    shot = [f"{item.query} {'ABCD'[i % 4]}\n\n" for i, item in enumerate(items)]
    assert contexts[0] == shot[1] + shot[2] + items[0].query  # the first two, less the item itself
    assert contexts[3] == shot[0] + shot[1] + items[3].query
    with pytest.raises(UserError, match="--fewshot-seed"):
        choice.load_items(mmlu, None, 2, 7, 0, None)


def test_metrics_and_standard_errors_follow_the_harness():
    items = [
        choice_files.ChoiceItem("f:1", {}, "q", ("a", "bbbb"), 1),
        choice_files.ChoiceItem("f:2", {}, "q", ("a", "bbbb"), 0),
        choice_files.ChoiceItem("f:3", {}, "q", ("a", "bbbb"), 1),
    ]
    # lls [-1, -2]: acc picks "a"; per character "bbbb" (-0.5) beats "a" (-1).
    metrics, rows = choice.score(items, [[-1.0, -2.0]] * 3)
    assert (metrics["acc"], metrics["acc_norm"], metrics["total"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3)
    # sample standard deviation of [0, 1, 0] / sqrt(3)
    assert metrics["acc_stderr"] == pytest.approx((1 / 3) ** 0.5 / 3**0.5)
    assert rows[0]["chosen"] == 0 and rows[0]["chosen_norm"] == 1 and rows[0]["gold"] == 1


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q:", "choices": ["a", "b"]}, "missing answer"),
        ({"prompt": "Q:", "choices": ["a", "b"], "answer": "c"}, "not among the choices"),
        ({"prompt": "Q:", "choices": ["a", "b"], "answer": 5}, "not among the 2 choices"),
        ({"prompt": "Q:", "choices": [], "answer": 0}, "empty choices"),
        ({"question": "Q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}, "not among the choice"),
        ({"ctx": "c", "endings": ["a", "b"], "label": ""}, "missing answer"),
    ],
)
def test_bad_rows_fail_with_one_line_naming_the_row(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "Q:", "choices": ["a", "b"], "answer": 0} if "prompt" in row else None
    _write_jsonl(path, [r for r in (good, row) if r is not None])
    with pytest.raises(UserError) as caught:
        choice.load_items(path, None, 0, 1234, 0, None)
    text = str(caught.value)
    assert "\n" not in text and message in text and f"{path}:{2 if good else 1}" in text


def test_bad_csv_answer_and_cli_writes_nothing(cli, tmp_path):
    path = tmp_path / "bad.csv"
    # The first question is quoted over three lines, as MMLU's may be: the bad row starts on line 5.
    path.write_text('id,question,A,B,C,D,answer\n1,"Q, on\nthree\nlines",a,b,c,d,A\n2,Q2,a,b,c,d,E\n')
    result = cli("evaluate", "hf:nowhere", "--task", "choice", "--data", path, "--out", tmp_path / "out", ok=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and f"{path}:5:" in lines[0] and "'E'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_choice_options_are_refused_elsewhere(cli, tmp_path):
    for option, value in (("--num-fewshot", "2"), ("--fewshot-seed", "3"), ("--fewshot-data", tmp_path)):
        result = cli("evaluate", "hf:x", "--task", "qa", "--data", tmp_path / "d.json", option, value, ok=False)
        assert result.exit_code == 2 and option in result.stderr and "--task choice" in result.stderr
    args = ["evaluate", "hf:x", "--task", "choice", "--data", tmp_path / "d.jsonl"]
    result = cli(*args, "--metric", "squad", ok=False)
    assert result.exit_code == 2 and "--metric" in result.stderr


def test_shared_contexts_score_like_separate_sequences(tmp_path):
    """Choices that share all but their last token are scored from one sequence: same numbers as one each."""
    import jax
    import numpy as np
    from flax import nnx

    from bigmodel_cli.evaluate.loglik import logprobs
    from tests.test_hf import tiny_loaded

    loaded = tiny_loaded(tmp_path)  # 64 positions
    model = nnx.merge(loaded.graphdef, loaded.params)
    prompt, long_prompt = [5, 9, 11, 3], list(range(1, 90))  # the long one is cut from the left
    pairs = [(prompt, [t]) for t in (7, 8, 9)] + [(prompt, [7, 12, 13]), (long_prompt, [4, 6])]

    forward = jax.jit(lambda tokens: jax.nn.log_softmax(model(tokens), axis=-1))  # one shape: [1, 64]

    def alone(ids: list[int], cont: list[int]) -> float:
        seq = (ids + cont)[-65:]
        padded = np.zeros((1, 64), np.int32)  # causal: what follows the sequence changes nothing
        padded[0, : len(seq) - 1] = seq[:-1]
        logp = np.asarray(forward(padded))[0]
        return sum(float(logp[len(seq) - len(cont) - 1 + i, t]) for i, t in enumerate(cont))

    scored = logprobs(loaded, pairs, batch_size=2)
    assert [n for _, n in scored] == [1, 1, 1, 3, 2]
    for (total, _), (ids, cont) in zip(scored, pairs, strict=True):
        assert total == pytest.approx(alone(ids, cont), abs=1e-4)
