"""Extractive QA scores for SQuAD-format files, by the official SQuAD v1.1/v2.0 or CMRC 2018 rules."""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from bigmodel_cli.tasks.metrics import cjk_language

QaMetric = Literal["auto", "squad", "cmrc2018"]
QA_METRICS: tuple[QaMetric, ...] = ("auto", "squad", "cmrc2018")

# ---------------------------------------------------------------------------------------------------------
# SQuAD (English)
# ---------------------------------------------------------------------------------------------------------

# Only ASCII punctuation: the official script uses string.punctuation, so "’" or "，" survive normalisation
# there and must survive here too, or our numbers stop being comparable with published SQuAD results.
_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

SquadVersion = Literal["1.1", "2.0"]


def normalize_answer(s: str) -> str:
    """Normalise an answer exactly as the official SQuAD v1.1 evaluation script does."""
    # The official order matters: punctuation is stripped before articles, so "the-end" -> "theend" keeps no
    # article, and articles become a space (not "") so what surrounds them never glues together.
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ASCII_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_gold_list(ground_truths: str | Sequence[str]) -> list[str]:
    """Return the gold answers as a non-empty list, "" standing for 'no answer'."""
    # A bare str is itself a Sequence[str] of characters; scoring against each letter would silently
    # inflate EM/F1, so treat it as a single answer instead.
    if isinstance(ground_truths, str):
        return [ground_truths]
    golds = list(ground_truths)
    # The official v2 script scores a question without gold answers against the empty string.
    return golds or [""]


def _overlap_f1(pred: Sequence[str], gold: Sequence[str], both_empty: float) -> float:
    """Bag-of-tokens F1 between two token lists, with the given score when both are empty."""
    if not pred and not gold:
        return both_empty
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    # Same expression shape as the official script so results agree bit-for-bit, not just to rounding.
    return (2 * precision * recall) / (precision + recall)


def squad_exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Return 1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(g)) for g in _as_gold_list(ground_truths))


def squad_f1(prediction: str, ground_truths: str | Sequence[str], *, version: SquadVersion = "2.0") -> float:
    """Return the best SQuAD token F1 (0-1) of the prediction against any gold answer."""
    if version not in ("1.1", "2.0"):
        raise ValueError(f"version must be '1.1' or '2.0', got {version!r}")
    # The two official scripts differ only when both sides normalise to nothing: v1.1 scores that 0 (its
    # precision/recall path never sees a common token), v2.0 scores 1 so "no answer" can be right.
    both_empty = 1.0 if version == "2.0" else 0.0
    pred = normalize_answer(prediction).split()
    return max(_overlap_f1(pred, normalize_answer(g).split(), both_empty) for g in _as_gold_list(ground_truths))


# ---------------------------------------------------------------------------------------------------------
# CMRC 2018 (Chinese): the rules of the official cmrc2018_evaluate.py (ymcui/cmrc2018)
# ---------------------------------------------------------------------------------------------------------

# The official punctuation list, character for character. What it lacks matters as much: ASCII . , ( ) % ! ?
# ; ' " and full-width ％ ‘ 【 】 and the dash — are kept, and nothing is NFKC-folded, so "１２" never equals "12". Its
# entry "……" is two characters long and so never equals the single character tested: "…" is kept too.
_CMRC_PUNCT = frozenset("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』")


def _is_cmrc_chinese(ch: str) -> bool:
    """Return True for the characters the official script segments one by one (only U+4E00..U+9FA5)."""
    return "\u4e00" <= ch <= "\u9fa5"


@functools.cache
def _word_tokenizer() -> Any:
    """Return nltk's Treebank-style word tokenizer (imported on first use: nltk takes ~1 s to import)."""
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def cmrc_remove_punctuation(text: str) -> str:
    """Lowercase, strip and drop CMRC 2018's punctuation list: the form in which the official EM compares."""
    # Stripped before the punctuation goes, as officially: "北京 。" keeps its space and so misses "北京".
    return "".join(ch for ch in text.lower().strip() if ch not in _CMRC_PUNCT)


def cmrc_segment(text: str) -> list[str]:
    """Split text as the official CMRC 2018 F1 does: each Chinese character alone, other runs into words."""
    # The official script word-tokenizes runs with nltk.word_tokenize, which first splits sentences with the
    # pretrained Punkt model (data that cannot be assumed to be installed). Without that split, the only
    # difference is a "." that Punkt takes as a sentence end before more text in the same run, e.g.
    # "he left. then" -> official [..., "left", ".", "then"], here [..., "left.", "then"]; a final "." and
    # "?"/"!" are split off either way. An untrained Punkt would instead split after abbreviations ("mr. x"),
    # which the pretrained model keeps, so no split at all is the closer data-free choice.
    segments: list[str] = []
    run: list[str] = []
    for ch in text.lower().strip():
        if ch in _CMRC_PUNCT:
            continue  # dropped without ending the run, as officially: "a-b" is the one word "ab"
        if _is_cmrc_chinese(ch):
            if run:
                segments += _word_tokenizer().tokenize("".join(run))
                run = []
            segments.append(ch)
        else:
            run.append(ch)
    if run:
        segments += _word_tokenizer().tokenize("".join(run))
    return segments


def _longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    """Return the length of the longest contiguous run of segments shared by a and b."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def cmrc_f1(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Return the best CMRC 2018 F1 (0-1) of the prediction against any gold answer."""
    pred = cmrc_segment(prediction)
    best = 0.0
    for gold_text in _as_gold_list(ground_truths):
        gold = cmrc_segment(gold_text)
        # The official find_lcs is the longest common *substring* (contiguous), not subsequence: "大学北京"
        # against "北京大学" shares only 2 segments in a row. Empty on either side shares nothing: 0.
        common = _longest_common_substring(gold, pred)
        if common == 0:
            continue
        precision = 1.0 * common / len(pred)
        recall = 1.0 * common / len(gold)
        best = max(best, (2 * precision * recall) / (precision + recall))
    return best


def cmrc_exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Return 1.0 if the prediction equals any gold answer after cmrc_remove_punctuation, else 0.0."""
    pred = cmrc_remove_punctuation(prediction)
    return max(float(pred == cmrc_remove_punctuation(g)) for g in _as_gold_list(ground_truths))


# ---------------------------------------------------------------------------------------------------------
# Scoring a SQuAD-format file
# ---------------------------------------------------------------------------------------------------------


def _iter_qas(dataset: Mapping[str, Any] | Sequence[Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (context, question id, qa) for every question of a parsed SQuAD-format JSON file."""
    # Accept the whole file or just its "data" list, which is what the official scripts pass around.
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    number = 0
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                number += 1
                # A question without an id is numbered from 1 in file order, as the qa task reads it.
                yield paragraph.get("context", ""), str(qa.get("id", number)), qa


def question_ids(dataset: Mapping[str, Any] | Sequence[Any]) -> list[str]:
    """Every question id of a SQuAD-format file, in file order."""
    return [qid for _, qid, _ in _iter_qas(dataset)]


def detect_language(dataset: Mapping[str, Any] | Sequence[Any]) -> Literal["en", "zh"]:
    """Return "zh" when most letters/digits in the contexts and answers are Han or kana, else "en"."""
    texts: list[str] = []
    seen_contexts: set[int] = set()
    for context, _, qa in _iter_qas(dataset):
        texts += [a.get("text", "") for a in qa.get("answers", [])]
        # Every question of a paragraph shares the same context object; count it once.
        if id(context) not in seen_contexts:
            seen_contexts.add(id(context))
            texts.append(context)
    return "zh" if cjk_language(texts) else "en"


def _select(
    dataset: Mapping[str, Any] | Sequence[Any], question_ids: Sequence[str] | None
) -> list[tuple[str, dict[str, Any]]]:
    """Return (id, qa) of every question, or of the given ids in their order."""
    qas = [(qid, qa) for _, qid, qa in _iter_qas(dataset)]
    if question_ids is None:
        return qas
    by_id: dict[str, dict[str, Any]] = {}
    for qid, qa in qas:
        by_id.setdefault(qid, qa)
    unknown = [str(q) for q in question_ids if str(q) not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} question ids are not in the dataset, e.g. {unknown[:3]}")
    return [(str(q), by_id[str(q)]) for q in question_ids]


def _percent_split(scores: dict[str, float | int | str], name: str, sums: list[float]) -> None:
    """Add <name>_exact, <name>_f1 and <name>_total from [exact_sum, f1_sum, count] when count > 0."""
    exact, f1, count = sums
    # Like the official v2 script, a split is reported only when it has questions (no 0/0 scores).
    if count:
        scores.update({f"{name}_exact": 100.0 * exact / count, f"{name}_f1": 100.0 * f1 / count})
        scores[f"{name}_total"] = int(count)


def qa_scores(
    dataset: Mapping[str, Any] | Sequence[Any],
    predictions: Mapping[str, str],
    metric: QaMetric = "auto",
    question_ids: Sequence[str] | None = None,
) -> dict[str, float | int | str]:
    """Score {question id: answer} against a SQuAD-format file; EM and F1 are percentages (0-100).

    metric "auto" is cmrc2018 for Chinese data and squad otherwise (v2.0 rules when the file marks
    is_impossible). question_ids, when given, scores exactly those questions and divides by their count.
    """
    if metric not in QA_METRICS:
        raise ValueError(f"metric must be one of {', '.join(QA_METRICS)}, got {metric!r}")
    qas = _select(dataset, question_ids)
    if not qas:
        raise ValueError("no questions to score")
    if metric == "auto":
        metric = "cmrc2018" if detect_language(dataset) == "zh" else "squad"
    # v2.0 files mark every question with is_impossible; the v2 script then drops gold answers that
    # normalise to nothing, which v1.1 does not, so the two must be told apart to reproduce both exactly.
    is_v2 = metric == "squad" and any("is_impossible" in qa for _, _, qa in _iter_qas(dataset))

    exact_sum = f1_sum = 0.0
    missing = 0
    groups = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}  # has_answer -> [exact_sum, f1_sum, count]
    for qid, qa in qas:
        impossible = bool(qa.get("is_impossible", False))
        golds = [] if impossible else [a["text"] for a in qa.get("answers", [])]
        has_answer = bool(golds)  # the v2 script's qid_to_has_ans: before empty answers are dropped
        if is_v2:
            golds = [g for g in golds if normalize_answer(g)]

        prediction = predictions.get(qid)
        if prediction is None:
            # Counted in the divisor with score 0, as both official scripts do for an unanswered question.
            missing += 1
            exact = f1 = 0.0
        elif metric == "cmrc2018":
            if golds:
                exact, f1 = cmrc_exact_match(prediction, golds), cmrc_f1(prediction, golds)
            else:
                # CMRC itself has no unanswerable questions (its script would fail on one); score them like
                # SQuAD v2: right only when the answer is empty.
                exact = f1 = float(not cmrc_remove_punctuation(prediction))
        else:
            exact = squad_exact_match(prediction, golds)
            # v1.1 rules for answerable questions reproduce the v1.1 script; unanswerable ones need v2's
            # "empty matches empty" (for v2 files the two agree, since empty golds were filtered above).
            f1 = squad_f1(prediction, golds, version="1.1" if golds else "2.0")
        # Summed in file order from 0, then scaled once, as the official scripts do: same float rounding.
        exact_sum += exact
        f1_sum += f1
        group = groups[has_answer]
        group[0] += exact
        group[1] += f1
        group[2] += 1

    total = len(qas)
    exact_match = 100.0 * exact_sum / total
    f1_score = 100.0 * f1_sum / total
    scores: dict[str, float | int | str] = {
        "metric": "squad_v2" if is_v2 else metric,
        "exact_match": exact_match,
        "f1": f1_score,
    }
    if metric == "cmrc2018":
        scores["average"] = (exact_match + f1_score) * 0.5  # the official AVERAGE, printed first there
    scores.update(total=total, missing=missing)
    if groups[False][2]:
        _percent_split(scores, "HasAns", groups[True])
        _percent_split(scores, "NoAns", groups[False])
    return scores
