"""Pure metric functions behind `bigmodel evaluate --task ...` (QA, classification, generation, LM)."""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Literal

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
# Chinese / CJK (CMRC 2018 style)
# ---------------------------------------------------------------------------------------------------------

# Listed explicitly because several (e.g. "～") are Unicode symbols, not punctuation, yet CMRC drops them.
_CJK_PUNCT = frozenset("，。！？、；：「」『』（）《》〈〉【】〔〕“”‘’…—～·・")


def _is_cjk(ch: str) -> bool:
    """Return True for characters written without spaces between words (Han ideographs and kana)."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF  # CJK Unified Ideographs
        or 0x3400 <= cp <= 0x4DBF  # Extension A
        or 0x20000 <= cp <= 0x2FA1F  # Extensions B-F and compatibility supplement
        or 0xF900 <= cp <= 0xFAFF  # Compatibility ideographs
        or 0x3040 <= cp <= 0x30FF  # Hiragana and katakana
    )


def _is_punct(ch: str) -> bool:
    """Return True for ASCII, CJK or any other Unicode punctuation character."""
    return ch in _ASCII_PUNCT or ch in _CJK_PUNCT or unicodedata.category(ch).startswith("P")


def char_tokenize(s: str) -> list[str]:
    """Split text into single CJK characters and lowercased non-CJK runs, dropping whitespace/punctuation."""
    # NFKC first so full-width "ＮＬＰ２０１８" and half-width "NLP2018" (both common in Chinese text)
    # tokenise identically; it also folds full-width punctuation onto the ASCII set removed below.
    s = unicodedata.normalize("NFKC", s).lower()
    tokens: list[str] = []
    run: list[str] = []
    for ch in s:
        if ch.isspace() or _is_cjk(ch):
            if run:
                tokens.append("".join(run))
                run = []
            if not ch.isspace():
                tokens.append(ch)
        elif _is_punct(ch):
            # Dropped without ending the run, as SQuAD and CMRC both do: "3.14" -> "314", "U.S." -> "us".
            continue
        else:
            run.append(ch)
    if run:
        tokens.append("".join(run))
    return tokens


def _longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    """Return the length of the longest contiguous token run shared by a and b."""
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


def char_f1(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Return the best CMRC-2018 character-level F1 (0-1) of the prediction against any gold answer."""
    pred = char_tokenize(prediction)
    best = 0.0
    for gold_text in _as_gold_list(ground_truths):
        gold = char_tokenize(gold_text)
        if not pred or not gold:
            # Empty vs empty is a correct "no answer" (as SQuAD v2); CMRC itself never has empty golds.
            score = float(not pred and not gold)
        else:
            # CMRC counts the longest *contiguous* overlap, not a bag of characters, so a prediction with
            # the right characters in the wrong order ("大学北京" vs "北京大学") is not rewarded as correct.
            common = _longest_common_substring(pred, gold)
            if common == 0:
                score = 0.0
            else:
                precision = common / len(pred)
                recall = common / len(gold)
                score = (2 * precision * recall) / (precision + recall)
        best = max(best, score)
    return best


def char_exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Return 1.0 if the prediction's CJK tokens equal any gold answer's, ignoring spaces and punctuation."""
    # Comparing token lists (not joined strings) ignores spaces between CJK characters while still telling
    # "new york" from "newyork", and guarantees EM=1 implies F1=1.
    pred = char_tokenize(prediction)
    return max(float(pred == char_tokenize(g)) for g in _as_gold_list(ground_truths))


# ---------------------------------------------------------------------------------------------------------
# SQuAD-format dataset scoring
# ---------------------------------------------------------------------------------------------------------


def _iter_qas(dataset: Mapping[str, Any] | Sequence[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (context, qa) for every question of a parsed SQuAD-format JSON file."""
    # Accept the whole file or just its "data" list, which is what the official scripts pass around.
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield paragraph.get("context", ""), qa


def detect_language(dataset: Mapping[str, Any] | Sequence[Any]) -> Literal["en", "zh"]:
    """Return "zh" when most letters/digits in the contexts and answers are CJK, else "en"."""
    cjk = other = 0
    seen_contexts: set[int] = set()
    for context, qa in _iter_qas(dataset):
        texts = [a.get("text", "") for a in qa.get("answers", [])]
        # Every question of a paragraph shares the same context object; count it once.
        if id(context) not in seen_contexts:
            seen_contexts.add(id(context))
            texts.append(context)
        for text in texts:
            for ch in text:
                if _is_cjk(ch):
                    cjk += 1
                elif ch.isalnum():
                    other += 1
    return "zh" if cjk > other else "en"


def squad_scores(
    dataset: Mapping[str, Any] | Sequence[Any],
    predictions: Mapping[str, str],
    language: Literal["en", "zh", "auto"] = "auto",
) -> dict[str, float | int]:
    """Score {qid: answer} against a SQuAD v1.1/v2.0-format dataset; EM and F1 are percentages (0-100)."""
    if language == "auto":
        language = detect_language(dataset)
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en', 'zh' or 'auto', got {language!r}")
    qas = list(_iter_qas(dataset))
    if not qas:
        raise ValueError("dataset contains no questions")
    # v2.0 files mark every question with is_impossible; the v2 script then drops gold answers that
    # normalise to nothing, which v1.1 does not, so the two must be told apart to reproduce both exactly.
    is_v2 = any("is_impossible" in qa for _, qa in qas)

    def has_content(text: str) -> bool:
        return bool(char_tokenize(text)) if language == "zh" else bool(normalize_answer(text))

    exact_sum = f1_sum = 0.0
    missing = 0
    groups = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}  # has_answer -> [exact_sum, f1_sum, count]
    for _, qa in qas:
        golds = [a["text"] for a in qa.get("answers", [])]
        if qa.get("is_impossible", False):
            golds = []
        elif is_v2:
            golds = [g for g in golds if has_content(g)]
        has_answer = bool(golds)
        golds = golds or [""]

        prediction = predictions.get(qa["id"])
        if prediction is None:
            # Official v1.1 scores an unanswered question 0 (and prints a notice); we count it instead.
            missing += 1
            exact = f1 = 0.0
        elif language == "zh":
            exact = char_exact_match(prediction, golds)
            f1 = char_f1(prediction, golds)
        else:
            exact = squad_exact_match(prediction, golds)
            # v1.1 rules for answerable questions reproduce the v1.1 script; unanswerable ones need v2's
            # "empty matches empty" (for v2 files the two agree, since empty golds were filtered above).
            f1 = squad_f1(prediction, golds, version="1.1" if has_answer else "2.0")
        exact_sum += exact
        f1_sum += f1
        group = groups[has_answer]
        group[0] += exact
        group[1] += f1
        group[2] += 1

    total = len(qas)
    scores: dict[str, float | int] = {
        "exact_match": 100.0 * exact_sum / total,
        "f1": 100.0 * f1_sum / total,
        "total": total,
        "missing": missing,
    }
    no_ans_exact, no_ans_f1, no_ans_total = groups[False]
    if no_ans_total:
        has_exact, has_f1, has_total = groups[True]
        # Like the official v2 script, a split is reported only when it has questions (no 0/0 scores).
        if has_total:
            scores.update(
                HasAns_exact=100.0 * has_exact / has_total,
                HasAns_f1=100.0 * has_f1 / has_total,
                HasAns_total=int(has_total),
            )
        scores.update(
            NoAns_exact=100.0 * no_ans_exact / no_ans_total,
            NoAns_f1=100.0 * no_ans_f1 / no_ans_total,
            NoAns_total=int(no_ans_total),
        )
    return scores


# ---------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------


def _check_pairs(preds: Sequence[Any], golds: Sequence[Any]) -> None:
    """Raise ValueError unless preds and golds are non-empty and the same length."""
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions for {len(golds)} references")
    if not golds:
        raise ValueError("cannot score an empty set of examples")


def accuracy(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Return the fraction (0-1) of predictions equal to their gold label."""
    _check_pairs(preds, golds)
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def macro_f1(preds: Sequence[Hashable], golds: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """Return the unweighted mean (0-1) of per-label F1 over the gold labels plus the given labels."""
    _check_pairs(preds, golds)
    predicted = set(preds)
    gold_set = set(golds)
    # A listed label that never occurs on either side has no defined F1; counting it as 0 would punish a
    # model for a class the data does not contain, so it is left out. Labels only ever predicted (and not
    # listed) are already penalised through the recall of the gold labels they replaced.
    label_set = gold_set | {lab for lab in (labels or ()) if lab in predicted}
    tp: Counter[Hashable] = Counter()
    fp: Counter[Hashable] = Counter()
    fn: Counter[Hashable] = Counter()
    for p, g in zip(preds, golds, strict=True):
        if p == g:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    total = 0.0
    for lab in label_set:
        precision = tp[lab] / (tp[lab] + fp[lab]) if tp[lab] + fp[lab] else 0.0
        recall = tp[lab] / (tp[lab] + fn[lab]) if tp[lab] + fn[lab] else 0.0
        total += 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return total / len(label_set)


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------
# sacrebleu and rouge_score (which pulls in nltk) are imported inside the functions: they take a noticeable
# fraction of a second to import and most `bigmodel` commands never need them.


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Return corpus BLEU (0-100) from sacrebleu with its default settings, one reference per hypothesis."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Return corpus chrF (0-100) from sacrebleu with its default settings, one reference per hypothesis."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


@functools.cache
def _rouge_scorer() -> Any:
    """Return a shared ROUGE-1/2/L scorer with Porter stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Return mean ROUGE-1/2/L F-measures (0-100) over the examples."""
    # rouge_score's default tokenizer keeps only [a-z0-9] runs, so text in other scripts scores 0.
    _check_pairs(predictions, references)
    scorer = _rouge_scorer()
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        # The scorer's argument order is (target, prediction); swapping them swaps precision and recall.
        result = scorer.score(reference, prediction)
        for key in sums:
            sums[key] += result[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in sums.items()}


# ---------------------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------------------


def perplexity(mean_loss: float) -> float:
    """Return exp(mean per-token cross-entropy in nats), or inf when that overflows a float."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        # A diverged run can report a loss above ~709; inf is the honest answer, not a crash at report time.
        return math.inf
