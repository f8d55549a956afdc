"""Tests for bigmodel_cli.evaluate.metrics: hand-computed values plus an independent SQuAD v1.1 reference."""

import collections
import math
import random
import re
import string

import pytest

from bigmodel_cli.evaluate import metrics as M

# ---------------------------------------------------------------------------------------------------------
# Independent, deliberately naive re-implementation of the official SQuAD v1.1 evaluation logic, written
# from the published algorithm so the library is checked against something it shares no code with.
# ---------------------------------------------------------------------------------------------------------


def ref_normalize(s):
    def lower(text):
        return text.lower()

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1(prediction, ground_truth):
    prediction_tokens = ref_normalize(prediction).split()
    ground_truth_tokens = ref_normalize(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def ref_em(prediction, ground_truth):
    return ref_normalize(prediction) == ref_normalize(ground_truth)


def ref_max(fn, prediction, ground_truths):
    return max(fn(prediction, gt) for gt in ground_truths)


def ref_evaluate(articles, predictions):
    f1 = exact_match = total = 0
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue  # official: "Unanswered question ... will receive score 0."
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += ref_max(ref_em, prediction, ground_truths)
                f1 += ref_max(ref_f1, prediction, ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def squad(questions, version="1.1"):
    """Build a one-article SQuAD file from (id, [gold answers]) or (id, [gold], is_impossible) tuples."""
    qas = []
    for q in questions:
        qa = {"id": q[0], "question": "?", "answers": [{"text": t, "answer_start": 0} for t in q[1]]}
        if len(q) > 2:
            qa["is_impossible"] = q[2]
        qas.append(qa)
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": "ctx", "qas": qas}]}]}


# ---------------------------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------------------------


def test_normalize_answer_follows_official_algorithm():
    assert M.normalize_answer("  The  Quick, brown FOX! ") == "quick brown fox"
    assert M.normalize_answer("An apple a day") == "apple day"
    # Articles only as whole words; punctuation goes first so "the-end" -> "theend" keeps its "the".
    assert M.normalize_answer("Theater then") == "theater then"
    assert M.normalize_answer("the-end") == "theend"
    assert M.normalize_answer("A") == ""
    # Only ASCII punctuation is removed, exactly like string.punctuation in the official script.
    assert M.normalize_answer("Café’s “menu”") == "café’s “menu”"
    assert M.normalize_answer("1,000.5 $") == "10005"
    # Articles are replaced by a space, not deleted: visible next to non-ASCII, non-word characters.
    assert M.normalize_answer("«the»end") == "« »end"


V1_QUESTIONS = [
    ("q1", ["Denver Broncos"]),
    ("q2", ["Eiffel Tower", "the Eiffel Tower in Paris"]),
    ("q3", ["1,000 years"]),
    ("q4", ["An apple a day"]),
    ("q5", ["unanswered"]),
    ("q6", ["the cat the cat sat"]),
    ("q7", ["Theater"]),
]
V1_PREDICTIONS = {
    # "denver broncos" == "denver broncos"                                      -> EM 1, F1 1
    "q1": "the Denver Broncos.",
    # pred "eiffel tower paris" (3 tokens)
    #   vs "eiffel tower":          common 2, P=2/3, R=1    -> F1 = 0.8
    #   vs "eiffel tower in paris": common 3, P=1,   R=3/4  -> F1 = 6/7   (max) -> EM 0, F1 6/7
    "q2": "  EIFFEL   tower, Paris ",
    # "thousand years" vs "1000 years": common 1, P=R=1/2                       -> EM 0, F1 0.5
    "q3": "a thousand years",
    # "apple day" == "apple day" (articles removed on both sides)               -> EM 1, F1 1
    "q4": "apple day!",
    # q5 missing                                                                -> EM 0, F1 0
    # "cat cat cat" vs "cat cat sat": Counter overlap min(3,2)=2, P=R=2/3       -> EM 0, F1 2/3
    "q6": "cat cat cat",
    # "theater" == "theater" ("the" inside a word is kept)                      -> EM 1, F1 1
    "q7": "the theater",
    "not-in-dataset": "ignored",
}
# EM: 3/7. F1: (1 + 6/7 + 1/2 + 1 + 0 + 2/3 + 1) / 7 = (211/42) / 7.
V1_EXPECTED_EM = 100.0 * 3 / 7
V1_EXPECTED_F1 = 100.0 * 211 / 42 / 7


def test_squad_v11_hand_computed_values():
    scores = M.squad_scores(squad(V1_QUESTIONS), V1_PREDICTIONS, language="en")
    assert scores["exact_match"] == pytest.approx(V1_EXPECTED_EM, abs=1e-9)
    assert scores["f1"] == pytest.approx(V1_EXPECTED_F1, abs=1e-9)
    assert scores["total"] == 7
    assert scores["missing"] == 1
    # No unanswerable questions, so no HasAns/NoAns split.
    assert not any(k.startswith(("HasAns", "NoAns")) for k in scores)


def test_squad_v11_matches_reference_implementation():
    data = squad(V1_QUESTIONS)
    ref = ref_evaluate(data["data"], V1_PREDICTIONS)
    ours = M.squad_scores(data, V1_PREDICTIONS, language="en")
    assert ours["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-9)
    assert ours["f1"] == pytest.approx(ref["f1"], abs=1e-9)
    assert ref["f1"] == pytest.approx(V1_EXPECTED_F1, abs=1e-9)  # the reference agrees with the hand values
    # "auto" must pick English for this data and give the same result.
    assert M.squad_scores(data, V1_PREDICTIONS) == ours


def test_squad_per_example_functions():
    assert M.squad_exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert M.squad_f1("  EIFFEL   tower, Paris ", ["Eiffel Tower", "the Eiffel Tower in Paris"]) == (
        pytest.approx(6 / 7)
    )
    # A bare string is one answer, not a list of characters.
    assert M.squad_exact_match("x", "xyz") == 0.0
    assert M.squad_f1("x y", "x") == pytest.approx(2 / 3)
    # The v1.1 / v2.0 scripts differ only when both sides normalise to nothing.
    assert M.squad_f1("The", ["a"], version="1.1") == 0.0
    assert M.squad_f1("The", ["a"], version="2.0") == 1.0
    with pytest.raises(ValueError):
        M.squad_f1("a", ["b"], version="3")


def test_squad_randomised_agreement_with_reference():
    # Noisy predictions built from a vocabulary full of articles, punctuation, case and spacing variants.
    rng = random.Random(1234)
    vocab = "The the a An cat Cat. sat mat, on (mat) 1,000 1000 x-ray xray théâtre then ! Paris paris".split()
    vocab.append("  ")

    def phrase(lo):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, 6)))

    questions, preds = [], {}
    for i in range(300):
        golds = [phrase(1) for _ in range(rng.randint(1, 3))]
        questions.append((f"q{i}", golds))
        if rng.random() < 0.9:
            preds[f"q{i}"] = phrase(0)
        pred = preds.get(f"q{i}", "")
        assert M.squad_f1(pred, golds, version="1.1") == pytest.approx(
            ref_max(ref_f1, pred, golds), abs=1e-12
        )
        assert M.squad_exact_match(pred, golds) == float(ref_max(ref_em, pred, golds))
    data = squad(questions)
    ref = ref_evaluate(data["data"], preds)
    ours = M.squad_scores(data, preds, language="en")
    assert ours["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-9)
    assert ours["f1"] == pytest.approx(ref["f1"], abs=1e-9)
    assert ours["missing"] == 300 - len(preds)


def test_squad_rejects_empty_dataset_and_bad_language():
    with pytest.raises(ValueError):
        M.squad_scores({"data": []}, {})
    with pytest.raises(ValueError):
        M.squad_scores(squad(V1_QUESTIONS), V1_PREDICTIONS, language="fr")


# ---------------------------------------------------------------------------------------------------------
# SQuAD v2.0 (unanswerable questions)
# ---------------------------------------------------------------------------------------------------------


def test_squad_v2_no_answer_handling():
    data = squad(
        [
            ("a", [], True),  # pred ""                 -> gold [""]: EM 1, F1 1
            ("b", [], True),  # pred "something"        -> EM 0, F1 0
            ("c", [], True),  # pred "The." -> ""        -> EM 1, F1 1
            ("d", ["Paris"], False),  # pred ""         -> EM 0, F1 0
            # pred "in paris france": vs "paris" P=1/3 R=1 F1=0.5;
            #                         vs "in paris" P=2/3 R=1 F1=0.8      -> EM 0, F1 0.8
            ("e", ["Paris", "in Paris"], False),
            ("f", [], True),  # missing                 -> EM 0, F1 0
        ],
        version="v2.0",
    )
    preds = {"a": "", "b": "something", "c": "The.", "d": "", "e": "in Paris, France"}
    scores = M.squad_scores(data, preds, language="en")
    assert scores["total"] == 6
    assert scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(100.0 * 2 / 6, abs=1e-9)
    assert scores["f1"] == pytest.approx(100.0 * 2.8 / 6, abs=1e-9)
    assert scores["HasAns_total"] == 2
    assert scores["HasAns_exact"] == pytest.approx(0.0, abs=1e-9)
    assert scores["HasAns_f1"] == pytest.approx(40.0, abs=1e-9)
    assert scores["NoAns_total"] == 4
    assert scores["NoAns_exact"] == pytest.approx(50.0, abs=1e-9)
    assert scores["NoAns_f1"] == pytest.approx(50.0, abs=1e-9)


def test_squad_v2_impossible_flag_overrides_answers_and_empty_golds_are_dropped():
    data = squad(
        [
            ("x", ["plausible but wrong"], True),  # impossible: gold is [""] whatever "answers" says
            ("y", ["the", "Rome"], False),  # v2 drops "the" (normalises to ""), so "" cannot match it
        ]
    )
    scores = M.squad_scores(data, {"x": "", "y": ""}, language="en")
    assert scores["NoAns_exact"] == 100.0
    assert scores["HasAns_exact"] == 0.0
    assert scores["exact_match"] == 50.0
    assert "HasAns_f1" in scores and "NoAns_f1" in scores


def test_squad_v2_all_answerable_has_no_split():
    scores = M.squad_scores(squad([("x", ["Rome"], False)]), {"x": "rome"}, language="en")
    assert scores["exact_match"] == 100.0
    assert "NoAns_total" not in scores


# ---------------------------------------------------------------------------------------------------------
# Chinese / CJK
# ---------------------------------------------------------------------------------------------------------


def test_char_tokenize_segments_cjk_and_keeps_ascii_runs():
    assert M.char_tokenize("我爱 NLP 2018年，「北京」！") == ["我", "爱", "nlp", "2018", "年", "北", "京"]
    # Full-width letters/digits fold onto ASCII; punctuation inside a run is dropped without splitting it.
    assert M.char_tokenize("ＮＬＰ２０１８ U.S.") == ["nlp2018", "us"]
    assert M.char_tokenize("，。！？、；：「」『』（）《》“”‘’ .,!?") == []


def test_char_f1_known_values():
    # "北京大学" (4 chars) vs "北京" (2): overlap 2, P=1/2, R=1 -> F1 = 2/3 (the "。" is ignored).
    assert M.char_f1("北京大学。", ["北京"]) == pytest.approx(2 / 3)
    # [我, 爱, nlp, 2018, 年] vs [爱, nlp]: overlap 2, P=2/5, R=1 -> F1 = 4/7.
    assert M.char_f1("我爱 NLP 2018年", ["爱nlp"]) == pytest.approx(4 / 7)
    # CMRC counts the longest contiguous overlap: "大学北京" vs "北京大学" shares only a 2-char run -> 0.5.
    assert M.char_f1("大学北京", ["北京大学"]) == pytest.approx(0.5)
    # Max over gold answers.
    assert M.char_f1("北京大学。", ["上海", "北京大学"]) == pytest.approx(1.0)
    assert M.char_f1("上海", ["北京"]) == 0.0
    assert M.char_f1("", [""]) == 1.0
    assert M.char_f1("北京", [""]) == 0.0


def test_char_exact_match_ignores_spaces_and_punctuation():
    assert M.char_exact_match("北 京！", ["北京"]) == 1.0
    assert M.char_exact_match("「北京」", ["上海", "北京"]) == 1.0
    assert M.char_exact_match("New York.", ["new york"]) == 1.0
    assert M.char_exact_match("newyork", ["new york"]) == 0.0
    assert M.char_exact_match("北京市", ["北京"]) == 0.0


def test_squad_scores_chinese_auto_detection():
    data = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "北京大学创建于1898年，初名京师大学堂。",
                        "qas": [
                            {"id": "z1", "answers": [{"text": "1898年"}]},
                            {"id": "z2", "answers": [{"text": "京师大学堂"}]},
                        ],
                    }
                ]
            }
        ]
    }
    preds = {"z1": "1898年。", "z2": "京师大学"}
    assert M.detect_language(data) == "zh"
    assert M.detect_language(squad(V1_QUESTIONS)) == "en"
    # z1: EM 1, F1 1. z2: [京,师,大,学] vs [京,师,大,学,堂]: P=1, R=4/5 -> F1 8/9, EM 0.
    scores = M.squad_scores(data, preds)
    assert scores["exact_match"] == pytest.approx(50.0, abs=1e-9)
    assert scores["f1"] == pytest.approx(100.0 * (1 + 8 / 9) / 2, abs=1e-9)
    assert M.squad_scores(data, preds, language="zh") == scores
    # English rules score both 0: "。" is not in string.punctuation, so "1898年。" != "1898年", and
    # whitespace tokenisation sees "京师大学" as a single token that differs from the gold one.
    assert M.squad_scores(data, preds, language="en")["f1"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------


def test_accuracy():
    assert M.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert M.accuracy(["a"], ["b"]) == 0.0
    with pytest.raises(ValueError):
        M.accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        M.accuracy([], [])


def test_macro_f1_known_values():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "b"]
    # a: TP1 FP0 FN1 -> P=1 R=1/2 F1=2/3; b: TP1 FP2 FN0 -> P=1/3 R=1 F1=1/2; c: TP0 -> 0.
    # Macro = (2/3 + 1/2 + 0) / 3 = 7/18.
    assert M.macro_f1(preds, golds) == pytest.approx(7 / 18)
    # "d" is neither gold nor predicted: it contributes nothing.
    assert M.macro_f1(preds, golds, labels=["a", "b", "c", "d"]) == pytest.approx(7 / 18)
    # "e" is predicted but not gold: outside the label set unless listed, then it scores F1 0.
    assert M.macro_f1(["a", "e"], ["a", "b"]) == pytest.approx(1 / 2)
    assert M.macro_f1(["a", "e"], ["a", "b"], labels=["e"]) == pytest.approx(1 / 3)
    assert M.macro_f1(golds, golds) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Generation and language modelling
# ---------------------------------------------------------------------------------------------------------

REFS = ["the quick brown fox jumps over the lazy dog", "a journey of a thousand miles begins with one step"]


def test_bleu_identical_and_disjoint():
    assert M.bleu(REFS, REFS) == pytest.approx(100.0)
    disjoint = ["zebra yak walrus vole umbrella tiger", "seven eight nine ten eleven twelve thirteen"]
    assert M.bleu(disjoint, REFS) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        M.bleu(REFS, REFS[:1])


def test_chrf_ordering():
    close = [
        "the quick brown fox jumped over the lazy dog",
        "a journey of a thousand miles starts with a step",
    ]
    far = ["the slow fox sleeps", "one step"]
    disjoint = ["zzz qqq", "xxx vvv"]
    scores = [M.chrf(h, REFS) for h in (REFS, close, far, disjoint)]
    assert scores[0] == pytest.approx(100.0)
    assert scores[0] > scores[1] > scores[2] > scores[3]


def test_rouge():
    identical = M.rouge(REFS, REFS)
    assert set(identical) == {"rouge1", "rouge2", "rougeL"}
    for value in identical.values():
        assert value == pytest.approx(100.0)
    # Stemming: "running cats" and "run cat" have the same stems.
    assert M.rouge(["running cats"], ["run cat"])["rouge1"] == pytest.approx(100.0)
    # One example identical, one disjoint -> mean of 100 and 0.
    assert M.rouge([REFS[0], "zebra"], REFS)["rouge1"] == pytest.approx(50.0)


def test_perplexity():
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert M.perplexity(1e6) == math.inf
    assert math.isnan(M.perplexity(float("nan")))
