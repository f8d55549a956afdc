"""Pure metric functions behind `bigmodel evaluate --task ...` (classification, generation, LM); QA is qa_metrics."""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Literal

# ---------------------------------------------------------------------------------------------------------
# Writing systems
# ---------------------------------------------------------------------------------------------------------


def _is_han(cp: int) -> bool:
    """Return True for a code point of a Han ideograph block."""
    return (
        0x4E00 <= cp <= 0x9FFF  # CJK Unified Ideographs
        or 0x3400 <= cp <= 0x4DBF  # Extension A
        or 0x20000 <= cp <= 0x2FA1F  # Extensions B-F and compatibility supplement
        or 0xF900 <= cp <= 0xFAFF  # Compatibility ideographs
    )


def _is_kana(cp: int) -> bool:
    """Return True for a hiragana or katakana code point."""
    return 0x3040 <= cp <= 0x30FF


def cjk_language(texts: Iterable[str]) -> Literal["zh", "ja"] | None:
    """Return "ja" or "zh" when most letters and digits of the texts are kana or Han, else None."""
    han = kana = other = 0
    for text in texts:
        for ch in text:
            cp = ord(ch)
            if _is_kana(cp):
                kana += 1
            elif _is_han(cp):
                han += 1
            elif ch.isalnum():
                other += 1
    if han + kana <= other:
        return None
    # Japanese writes its grammar in kana and Chinese uses none, so a modest share of kana is decisive.
    return "ja" if 10 * kana >= han + kana else "zh"


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


def macro_f1(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Return the unweighted mean (0-1) of per-label F1 over every label that is gold or predicted, as
    scikit-learn's f1_score(golds, preds, average="macro") does. An empty prediction (an example without one)
    is a miss of its gold label, not a label of its own: f1_score with labels= the gold and predicted ones."""
    _check_pairs(preds, golds)
    label_set = set(golds) | {p for p in preds if p != ""}
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


# Language names and codes (ISO 639-1/2/3, English and native names) whose text needs its own BLEU tokenizer.
_CJK_NAMES: dict[str, Literal["zh", "ja"]] = {
    **dict.fromkeys(["zh", "zho", "chi", "cmn", "yue", "chinese", "mandarin", "cantonese"], "zh"),
    **dict.fromkeys(["中文", "汉语", "漢語", "华语", "華語", "普通话", "简体中文", "繁體中文", "粤语", "粵語"], "zh"),
    **dict.fromkeys(["ja", "jpn", "japanese", "日本語", "日本语", "日语", "日文"], "ja"),
}
# Values that name no language ("und" is BCP 47's "undetermined"): the references' script decides instead.
_NO_LANGUAGE = frozenset(["", "auto", "und", "unknown", "none"])


def _named_cjk_language(language: str) -> Literal["zh", "ja"] | None:
    """Return "zh" or "ja" when the name or code ("Chinese", "zh-CN", "中文", "ja_JP"...) says so, else None."""
    # Any word of the name counts, so "zh-Hant", "Simplified Chinese" and "Chinese (Traditional)" all do.
    words = re.split(r"[\s\-_()（）,/]+", language.lower())
    return next((_CJK_NAMES[w] for w in words if w in _CJK_NAMES), None)


@functools.cache
def _mecab_works() -> bool:
    """Return True when sacrebleu's ja-mecab tokenizer can be built (MeCab and the IPA dictionary installed)."""
    from sacrebleu.metrics import BLEU

    # sacrebleu raises RuntimeError when mecab-python3 or ipadic is missing and AssertionError for a non-IPA
    # dictionary; a broken native library surfaces as other errors. Any of them means "use char".
    try:
        BLEU(tokenize="ja-mecab")
    except Exception:
        return False
    return True


def bleu_tokenizer(language: str | None, references: Sequence[str]) -> str:
    """Return the sacrebleu tokenizer for the target language: zh, ja-mecab (else char) or 13a.

    The language is a name or code; when it is None or names no language ("", "auto", "und"), the
    references' script decides. Any other name is trusted: "German" gets 13a whatever the references hold.
    """
    name = (language or "").strip().lower()
    lang = cjk_language(references) if name in _NO_LANGUAGE else _named_cjk_language(name)
    if lang == "zh":
        return "zh"
    if lang == "ja":
        # Japanese has no spaces between words: without MeCab, 13a would see each sentence as one long word.
        return "ja-mecab" if _mecab_works() else "char"
    return "13a"


def bleu(hypotheses: Sequence[str], references: Sequence[str], language: str | None = None) -> dict[str, Any]:
    """Return {"bleu": corpus BLEU (0-100), "bleu_signature": sacrebleu's signature} for the target language."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    metric = BLEU(tokenize=bleu_tokenizer(language, references))
    score = metric.corpus_score(list(hypotheses), [list(references)])
    # The signature (nrefs, case, tokenizer, smoothing, version) is what makes a BLEU number comparable.
    return {"bleu": float(score.score), "bleu_signature": str(metric.get_signature())}


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Return corpus chrF (0-100) from sacrebleu with its default settings, one reference per hypothesis."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


class CjkCharacterTokenizer:
    """rouge_score's tokenizer for Chinese and Japanese text: each Han or kana character one token, as Chinese
    summarization (LCSTS, NLPCC) scores ROUGE, and any other run of letters or digits one lowercase word.
    Punctuation separates and is dropped, as in rouge_score's own tokenizer."""

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        word = ""
        for ch in text.lower():
            cjk = _is_han(ord(ch)) or _is_kana(ord(ch))
            if ch.isalnum() and not cjk:
                word += ch
                continue
            tokens += [word] if word else []
            word = ""
            tokens += [ch] if cjk and ch.isalnum() else []
        return tokens + ([word] if word else [])


# What the ROUGE numbers were computed on, recorded beside them as BLEU's signature is.
ROUGE_WORDS = "rouge_score words, Porter-stemmed"
ROUGE_CJK_CHARACTERS = "Han and kana characters, other words lowercased"


@functools.cache
def _rouge_scorer(tokenize: str) -> Any:
    """A shared ROUGE-1/2/L scorer: rouge_score's default (ASCII words, Porter stemming), or CJK characters."""
    from rouge_score import rouge_scorer

    if tokenize == ROUGE_CJK_CHARACTERS:
        return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CjkCharacterTokenizer())
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Return mean ROUGE-1/2/L F-measures (0-100) over the examples, and what they were computed on.

    rouge_score's default tokenizer keeps only [a-z0-9] runs: Chinese or Japanese text would score 0 whatever
    the summary, so references mostly in those scripts are scored on characters instead."""
    _check_pairs(predictions, references)
    tokenize = ROUGE_CJK_CHARACTERS if cjk_language(references) else ROUGE_WORDS
    scorer = _rouge_scorer(tokenize)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        # The scorer's argument order is (target, prediction); swapping them swaps precision and recall.
        result = scorer.score(reference, prediction)
        for key in sums:
            sums[key] += result[key].fmeasure
    return {**{key: 100.0 * value / len(predictions) for key, value in sums.items()}, "rouge_tokenize": tokenize}


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
