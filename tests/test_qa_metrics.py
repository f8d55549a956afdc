"""Tests for bigmodel_cli.tasks.qa_metrics: hand-computed SQuAD and CMRC 2018 values, a SQuAD reference."""

import collections
import random
import re
import string

import pytest

from bigmodel_cli.tasks import qa_metrics as Q

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
    assert Q.normalize_answer("  The  Quick, brown FOX! ") == "quick brown fox"
    assert Q.normalize_answer("An apple a day") == "apple day"
    # Articles only as whole words; punctuation goes first so "the-end" -> "theend" keeps its "the".
    assert Q.normalize_answer("Theater then") == "theater then"
    assert Q.normalize_answer("the-end") == "theend"
    assert Q.normalize_answer("A") == ""
    # Only ASCII punctuation is removed, exactly like string.punctuation in the official script.
    assert Q.normalize_answer("Café’s “menu”") == "café’s “menu”"
    assert Q.normalize_answer("1,000.5 $") == "10005"
    # Articles are replaced by a space, not deleted: visible next to non-ASCII, non-word characters.
    assert Q.normalize_answer("«the»end") == "« »end"


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
    scores = Q.qa_scores(squad(V1_QUESTIONS), V1_PREDICTIONS, metric="squad")
    assert scores["exact_match"] == pytest.approx(V1_EXPECTED_EM, abs=1e-9)
    assert scores["f1"] == pytest.approx(V1_EXPECTED_F1, abs=1e-9)
    assert scores["total"] == 7
    assert scores["missing"] == 1
    assert scores["metric"] == "squad"
    # No unanswerable questions, so no HasAns/NoAns split.
    assert not any(k.startswith(("HasAns", "NoAns")) for k in scores)


def test_squad_v11_matches_reference_implementation():
    data = squad(V1_QUESTIONS)
    ref = ref_evaluate(data["data"], V1_PREDICTIONS)
    ours = Q.qa_scores(data, V1_PREDICTIONS, metric="squad")
    assert ours["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-9)
    assert ours["f1"] == pytest.approx(ref["f1"], abs=1e-9)
    assert ref["f1"] == pytest.approx(V1_EXPECTED_F1, abs=1e-9)  # the reference agrees with the hand values
    # "auto" must pick English for this data and give the same result.
    assert Q.qa_scores(data, V1_PREDICTIONS) == ours


def test_squad_per_example_functions():
    assert Q.squad_exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert Q.squad_f1("  EIFFEL   tower, Paris ", ["Eiffel Tower", "the Eiffel Tower in Paris"]) == (
        pytest.approx(6 / 7)
    )
    # A bare string is one answer, not a list of characters.
    assert Q.squad_exact_match("x", "xyz") == 0.0
    assert Q.squad_f1("x y", "x") == pytest.approx(2 / 3)
    # The v1.1 / v2.0 scripts differ only when both sides normalise to nothing.
    assert Q.squad_f1("The", ["a"], version="1.1") == 0.0
    assert Q.squad_f1("The", ["a"], version="2.0") == 1.0
    with pytest.raises(ValueError):
        Q.squad_f1("a", ["b"], version="3")


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
        assert Q.squad_f1(pred, golds, version="1.1") == pytest.approx(ref_max(ref_f1, pred, golds), abs=1e-12)
        assert Q.squad_exact_match(pred, golds) == float(ref_max(ref_em, pred, golds))
    data = squad(questions)
    ref = ref_evaluate(data["data"], preds)
    ours = Q.qa_scores(data, preds, metric="squad")
    assert ours["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-9)
    assert ours["f1"] == pytest.approx(ref["f1"], abs=1e-9)
    assert ours["missing"] == 300 - len(preds)


def test_qa_scores_rejects_empty_dataset_unknown_ids_and_bad_metric():
    with pytest.raises(ValueError):
        Q.qa_scores({"data": []}, {})
    with pytest.raises(ValueError):
        Q.qa_scores(squad(V1_QUESTIONS), V1_PREDICTIONS, question_ids=[])
    with pytest.raises(ValueError, match="not in the dataset"):
        Q.qa_scores(squad(V1_QUESTIONS), V1_PREDICTIONS, question_ids=["q1", "nope"])
    with pytest.raises(ValueError):
        Q.qa_scores(squad(V1_QUESTIONS), V1_PREDICTIONS, metric="en")


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
    scores = Q.qa_scores(data, preds, metric="squad")
    assert scores["metric"] == "squad_v2"
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
    scores = Q.qa_scores(data, {"x": "", "y": ""}, metric="squad")
    assert scores["NoAns_exact"] == 100.0
    assert scores["HasAns_exact"] == 0.0
    assert scores["exact_match"] == 50.0
    assert "HasAns_f1" in scores and "NoAns_f1" in scores


def test_squad_v2_all_answerable_has_no_split():
    scores = Q.qa_scores(squad([("x", ["Rome"], False)]), {"x": "rome"}, metric="squad")
    assert scores["exact_match"] == 100.0
    assert "NoAns_total" not in scores


# ---------------------------------------------------------------------------------------------------------
# CMRC 2018: each rule of the official cmrc2018_evaluate.py, checked by hand
# ---------------------------------------------------------------------------------------------------------


def test_cmrc_punctuation_list_is_the_official_one():
    # In the list: Chinese full-width marks, full-width brackets, and ASCII - : _ * ^ / \ ~ ` + =.
    assert Q.cmrc_remove_punctuation("《北京》，「大学」（1998）e-mail a/b") == "北京大学1998email ab"
    # Not in the list, so kept: ASCII brackets and ".,%", full-width digits (no NFKC folding), "…" (the list
    # holds "……", two characters, which never equals one character) and "—".
    assert Q.cmrc_remove_punctuation("(1998) 3.5, 50%") == "(1998) 3.5, 50%"
    assert Q.cmrc_remove_punctuation("１２…—") == "１２…—"
    # Lowercased and stripped, and stripped *before* punctuation goes: the space before "。" survives.
    assert Q.cmrc_remove_punctuation("  NLP。 ") == "nlp"
    assert Q.cmrc_remove_punctuation("北京 。") == "北京 "


def test_cmrc_exact_match_follows_the_official_list():
    assert Q.cmrc_exact_match("１２", ["12"]) == 0.0  # full-width digits are other characters
    assert Q.cmrc_exact_match("(1998)", ["1998"]) == 0.0  # ASCII parentheses are not in the list
    assert Q.cmrc_exact_match("（1998）", ["1998"]) == 1.0  # full-width ones are
    assert Q.cmrc_exact_match("50%", ["50"]) == 0.0  # "%" is not in the list
    assert Q.cmrc_exact_match("北京。", ["北京"]) == 1.0
    assert Q.cmrc_exact_match(" 北京 ", ["北京"]) == 1.0  # outer spaces are stripped
    assert Q.cmrc_exact_match("北 京", ["北京"]) == 0.0  # inner ones are not
    assert Q.cmrc_exact_match("北京 。", ["北京"]) == 0.0  # strip comes before punctuation removal
    assert Q.cmrc_exact_match("NLP", ["上海", "nlp"]) == 1.0  # lowercased; max over gold answers


def test_cmrc_segment_mixes_characters_and_words():
    # Chinese characters one by one, other runs through the word tokenizer; a dropped "，" does not end a run.
    assert Q.cmrc_segment("我爱NLP和New York，1998年") == ["我", "爱", "nlp", "和", "new", "york1998", "年"]
    assert Q.cmrc_segment("U.S. Army（美国陆军）") == ["u.s.", "army", "美", "国", "陆", "军"]
    assert Q.cmrc_segment(" (1998) ") == ["(", "1998", ")"]
    assert Q.cmrc_segment("50%") == ["50", "%"]
    assert Q.cmrc_segment("１２月") == ["１２", "月"]
    assert Q.cmrc_segment("e-mail") == ["email"]
    # Only U+4E00..U+9FA5 count as Chinese: U+9FA6 and beyond join a word run like Latin letters.
    assert Q.cmrc_segment("龥龥") == ["龥", "龥"]
    assert Q.cmrc_segment("龦龦") == ["龦龦"]
    # The one known difference: without Punkt's sentence split a mid-run "." stays on its word (officially,
    # with Punkt data installed, "left" and "." would be two segments). A final "." is split off either way.
    assert Q.cmrc_segment("he left. then") == ["he", "left.", "then"]
    assert Q.cmrc_segment("he left.") == ["he", "left", "."]


def test_cmrc_f1_longest_common_substring():
    # [北,京,的,大,学] vs [北,京,大,学]: the longest common *substring* is 2 segments (a subsequence would
    # be 4): P=2/5, R=2/4 -> F1 = 2*(2/5)*(1/2)/(9/10) = 4/9.
    assert Q.cmrc_f1("北京的大学", ["北京大学"]) == pytest.approx(4 / 9)
    # [我,爱,nlp,2018,年] vs [爱,nlp]: common run 2, P=2/5, R=1 -> F1 = 4/7.
    assert Q.cmrc_f1("我爱NLP 2018年", ["爱NLP"]) == pytest.approx(4 / 7)
    # [(,1998,)] vs [1998]: P=1/3, R=1 -> 1/2; [50,%] vs [50]: P=1/2, R=1 -> 2/3; "１２" shares nothing.
    assert Q.cmrc_f1("(1998)", ["1998"]) == pytest.approx(1 / 2)
    assert Q.cmrc_f1("50%", ["50"]) == pytest.approx(2 / 3)
    assert Q.cmrc_f1("１２", ["12"]) == 0.0
    # Spaces and listed punctuation do not count: F1 is 1 where EM is 0.
    assert Q.cmrc_f1("北 京 。", ["北京"]) == 1.0
    # Max over gold answers; nothing in common (or an empty side) is 0.
    assert Q.cmrc_f1("北京大学。", ["上海", "北京大学"]) == 1.0
    assert Q.cmrc_f1("北京大学。", ["上海", "北京"]) == pytest.approx(2 / 3)
    assert Q.cmrc_f1("", ["北京"]) == 0.0
    assert Q.cmrc_f1("北京", [""]) == 0.0


def cmrc_data():
    """A CMRC 2018-shaped file: mostly Chinese, with English words, numbers and a bad answer_start."""
    context = (
        "北京大学创建于1898年，初名京师大学堂。它的英文名是Peking University，简称PKU。北京大学是中国近代第一所"
        "国立综合性大学，也是中国最早以大学身份建立的学校之一，其成立标志着中国近代高等教育的开端。"
    )
    qas = [
        ("c1", ["1898年", "1898"]),
        ("c2", ["京师大学堂"]),
        ("c3", ["Peking University"]),
        ("c4", ["1898年"]),
        ("c5", ["北京大学"]),
        ("c6", ["PKU"]),
    ]
    # answer_start is wrong or absent on purpose: offsets play no part in scoring.
    qas = [{"id": q, "question": "？", "answers": [{"text": t, "answer_start": 999} for t in a]} for q, a in qas]
    del qas[5]["answers"][0]["answer_start"]
    return {"version": "v1.0", "data": [{"paragraphs": [{"context": context, "qas": qas}]}]}


CMRC_PREDICTIONS = {
    "c1": "1898年。",  # EM 1, F1 1
    "c2": "京师大学",  # [京,师,大,学] vs [京,师,大,学,堂]: P=1, R=4/5 -> F1 8/9, EM 0
    "c3": "the Peking University",  # [the,peking,university] vs [peking,university]: F1 0.8, EM 0
    "c4": "１８９８年",  # [１８９８,年] vs [1898,年]: P=R=1/2 -> F1 1/2, EM 0
    # c5 missing: EM 0, F1 0, still counted in the divisor
    "c6": "（PKU）",  # full-width brackets are in the list: EM 1, F1 1
}


def test_cmrc_scores_hand_computed_and_auto_chosen():
    data = cmrc_data()
    assert Q.detect_language(data) == "zh"
    scores = Q.qa_scores(data, CMRC_PREDICTIONS)
    em, f1 = 100.0 * 2 / 6, 100.0 * (1 + 8 / 9 + 0.8 + 0.5 + 0 + 1) / 6
    assert scores == {
        "metric": "cmrc2018",
        "exact_match": pytest.approx(em),
        "f1": pytest.approx(f1),
        "average": pytest.approx((em + f1) / 2),  # the official AVERAGE of EM and F1
        "total": 6,
        "missing": 1,
    }
    assert Q.qa_scores(data, CMRC_PREDICTIONS, metric="cmrc2018") == scores
    # The SQuAD rules can still be asked for: whitespace tokens make "京师大学" one wrong word.
    squad_rules = Q.qa_scores(data, CMRC_PREDICTIONS, metric="squad")
    assert squad_rules["metric"] == "squad" and squad_rules["f1"] < scores["f1"]


def test_question_ids_score_exactly_those_questions():
    data = cmrc_data()
    two = Q.qa_scores(data, CMRC_PREDICTIONS, question_ids=["c2", "c1"])
    assert two["total"] == 2 and two["missing"] == 0
    assert two["exact_match"] == pytest.approx(50.0)
    assert two["f1"] == pytest.approx(100.0 * (1 + 8 / 9) / 2)
    # A missing prediction inside the subset counts 0 and the divisor is still the subset's size.
    three = Q.qa_scores(data, CMRC_PREDICTIONS, question_ids=["c1", "c5", "c6"])
    assert (three["total"], three["missing"], three["exact_match"]) == (3, 1, pytest.approx(200.0 / 3))
    # The language (so the metric) is judged on the whole file, not the subset.
    assert Q.qa_scores(data, CMRC_PREDICTIONS, question_ids=["c3"])["metric"] == "cmrc2018"


def test_cmrc_unanswerable_questions_score_like_squad_v2():
    data = cmrc_data()
    data["data"][0]["paragraphs"][0]["qas"] += [
        {"id": "n1", "question": "？", "answers": [], "is_impossible": True},
        {"id": "n2", "question": "？", "answers": [], "is_impossible": True},
    ]
    scores = Q.qa_scores(data, {**CMRC_PREDICTIONS, "n1": "。", "n2": "北京"})
    assert scores["metric"] == "cmrc2018"
    assert (scores["NoAns_total"], scores["NoAns_exact"], scores["NoAns_f1"]) == (2, 50.0, 50.0)
    assert scores["HasAns_total"] == 6 and scores["total"] == 8


def test_questions_without_ids_are_numbered_in_file_order():
    data = squad([("x", ["Rome"]), ("y", ["Paris"])])
    for qa in data["data"][0]["paragraphs"][0]["qas"]:
        del qa["id"]
    assert Q.qa_scores(data, {"1": "rome", "2": "london"})["exact_match"] == 50.0
