#!/usr/bin/env python3
"""Our CMRC 2018 scores against the official cmrc2018_evaluate.py, on a generated CMRC-shaped dev set.

    git clone https://github.com/ymcui/cmrc2018 /tmp/cmrc2018
    python scripts/bench/cmrc2018_official_check.py /tmp/cmrc2018/baseline/cmrc2018_evaluate.py
Pass the Python 3 version of the official script (baseline/, "v6"; data/ and squad-style-data/ hold the same
rules for Python 2). It writes a dev file and predictions (exact answers, partial overlaps, extra punctuation,
full-width digits, English words, empty and missing answers) to a temporary folder, runs the official script
on them, and compares its printed AVERAGE/F1/EM, its unrounded totals and every question's EM and F1 with
bigmodel's qa_scores(metric="cmrc2018"). Exits 1 on any difference. Nothing of the official script is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import runpy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigmodel_cli.tasks import qa_metrics  # noqa: E402

HAN = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就"
    "分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
)
TERMS = ["NBA", "iPhone 6", "Google", "U.S. Army", "New York", "COVID-19", "C++", "3.14", "1998", "１２", "２０１８"]
TERMS += ["e-mail", "Wi-Fi", "don't", "100%", "(1998)", "Mr. Smith", "A.D.", "J.K. Rowling", "Windows XP", "MP3"]
WRAPS = [("《", "》"), ("“", "”"), ("(", ")"), ("（", "）"), ("「", "」"), ("", "。"), ("", "%"), ("", "…"), (" ", " ")]
FULL_WIDTH_DIGITS = str.maketrans("0123456789", "０１２３４５６７８９")


def make_context(rng: random.Random) -> str:
    """A paragraph of Chinese runs, English terms, numbers and Chinese punctuation."""
    parts = []
    for _ in range(rng.randint(25, 45)):
        r = rng.random()
        if r < 0.2:
            parts.append(rng.choice(TERMS))
        elif r < 0.3:
            parts.append(rng.choice("，。、；：！？") if rng.random() < 0.8 else rng.choice(["——", "·", "-"]))
        else:
            parts.append("".join(rng.choice(HAN) for _ in range(rng.randint(2, 6))))
    return "".join(parts)


def make_question(rng: random.Random, context: str, qid: str) -> tuple[dict, str | None]:
    """A question with 1-3 gold spans of the context, and a prediction for it (None: left out)."""
    start = rng.randrange(len(context) - 4)
    end = min(len(context), start + rng.randint(2, 14))
    gold = context[start:end].strip() or context[start : start + 2]
    golds = [gold]
    for _ in range(rng.randint(0, 2)):  # annotators differ by a few characters, or agree exactly
        s, e = max(0, start + rng.randint(-2, 2)), min(len(context), end + rng.randint(-2, 2))
        golds.append(context[s:e].strip() or gold if s < e else gold)
    qa = {"id": qid, "question": "问题？", "answers": [{"text": g, "answer_start": context.find(g)} for g in golds]}
    r = rng.random()
    if r < 0.07:
        return qa, None
    if r < 0.10:
        return qa, ""
    if r < 0.35:
        return qa, rng.choice(golds)
    if r < 0.55:  # partial overlap: the gold span moved or stretched
        s, e = max(0, start + rng.randint(-4, 4)), min(len(context), end + rng.randint(-4, 4))
        return qa, context[s:e] if s < e else gold
    if r < 0.67:
        left, right = rng.choice(WRAPS)
        return qa, left + gold + right
    if r < 0.72:
        return qa, gold.translate(FULL_WIDTH_DIGITS)
    if r < 0.77:
        return qa, rng.choice([gold.upper(), gold.lower(), " ".join(gold), gold + " " + rng.choice(TERMS)])
    if r < 0.87:  # a wrong span elsewhere
        s = rng.randrange(len(context) - 4)
        return qa, context[s : s + rng.randint(2, 10)]
    return qa, context[max(0, start - rng.randint(0, 8)) : end + rng.randint(0, 8)]


def make_data(n: int, seed: int) -> tuple[dict, dict[str, str]]:
    """A CMRC 2018-shaped (SQuAD-format) dev set of n questions and predictions for most of them."""
    rng = random.Random(seed)
    data: list[dict] = []
    predictions: dict[str, str] = {}
    count = 0
    while count < n:
        context = make_context(rng)
        qas = []
        for _ in range(min(rng.randint(3, 6), n - count)):
            count += 1
            qid = f"DEV_{len(data)}_QUERY_{len(qas)}"
            qa, prediction = make_question(rng, context, qid)
            qas.append(qa)
            if prediction is not None:
                predictions[qid] = prediction
        data.append(
            {"id": f"DEV_{len(data)}", "title": "标题", "paragraphs": [{"id": "p", "context": context, "qas": qas}]}
        )
    return {"version": "v1.0", "data": data}, predictions


def load_official(path: Path) -> dict:
    """The official script's functions, with nltk.word_tokenize made data-free when Punkt is not installed."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        from nltk.tokenize import NLTKWordTokenizer

        # The only change to the official code path: word_tokenize without its Punkt sentence split.
        nltk.word_tokenize = NLTKWordTokenizer().tokenize
        print("note: no Punkt data, so nltk.word_tokenize is replaced by NLTKWordTokenizer().tokenize")
    return runpy.run_path(str(path), run_name="cmrc2018_official")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("official", type=Path, help="path of the official cmrc2018_evaluate.py (Python 3 version)")
    parser.add_argument("--questions", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset, predictions = make_data(args.questions, args.seed)
    official = load_official(args.official)
    with tempfile.TemporaryDirectory() as tmp:
        data_file, pred_file = Path(tmp) / "dev.json", Path(tmp) / "predictions.json"
        data_file.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
        pred_file.write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
        printed, stderr = io.StringIO(), io.StringIO()
        argv, sys.argv = sys.argv, [str(args.official), str(data_file), str(pred_file)]
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(stderr):
                runpy.run_path(str(args.official), run_name="__main__")
        finally:
            sys.argv = argv
        printed_scores = json.loads(printed.getvalue())
        with contextlib.redirect_stderr(stderr):  # its "Unanswered question" lines, already counted in SKIP
            f1, em, total, skip = official["evaluate"](json.loads(data_file.read_text(encoding="utf-8")), predictions)

    ours = qa_metrics.qa_scores(dataset, predictions, metric="cmrc2018")
    rows = [
        ("AVERAGE", printed_scores["AVERAGE"], f"{ours['average']:.3f}", (em + f1) * 0.5, ours["average"]),
        ("F1", printed_scores["F1"], f"{ours['f1']:.3f}", f1, ours["f1"]),
        ("EM", printed_scores["EM"], f"{ours['exact_match']:.3f}", em, ours["exact_match"]),
        ("TOTAL", printed_scores["TOTAL"], ours["total"], total, ours["total"]),
        ("SKIP", printed_scores["SKIP"], ours["missing"], skip, ours["missing"]),
    ]
    print(f"{'':8} {'official':>10} {'ours':>10}   {'official (unrounded)':>22} {'ours (unrounded)':>22}")
    for name, printed_value, ours_printed, raw, ours_raw in rows:
        print(f"{name:8} {printed_value!s:>10} {ours_printed!s:>10}   {raw!r:>22} {ours_raw!r:>22}")
    differ = sum(str(p) != str(o) or r != o_raw for _, p, o, r, o_raw in rows)

    per_question = 0
    for article in dataset["data"]:
        for qa in article["paragraphs"][0]["qas"]:
            if qa["id"] not in predictions:
                continue
            golds, prediction = [a["text"] for a in qa["answers"]], predictions[qa["id"]]
            theirs = (official["calc_em_score"](golds, prediction), official["calc_f1_score"](golds, prediction))
            mine = (qa_metrics.cmrc_exact_match(prediction, golds), qa_metrics.cmrc_f1(prediction, golds))
            if theirs != mine:
                per_question += 1
                print(f"differs: {qa['id']} pred={prediction!r} golds={golds!r} official={theirs} ours={mine}")
    answered = len(predictions)
    print(f"{ours['total']} questions, {answered} answered: {per_question} differ in EM or F1; {differ} totals differ")
    sys.exit(1 if differ or per_question else 0)


if __name__ == "__main__":
    main()
