"""Tests for bigmodel_cli.tasks.metrics: hand-computed values and sacrebleu's own results (QA: test_qa_metrics)."""

import math

import numpy as np
import pytest
import sacrebleu

from bigmodel_cli.tasks import metrics as M

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
    # "e" is predicted but not gold: a label of its own, with F1 0, as scikit-learn counts it.
    assert M.macro_f1(["a", "e"], ["a", "b"]) == pytest.approx(1 / 3)
    # An example without a prediction misses its gold label and adds no label.
    assert M.macro_f1(["a", ""], ["a", "b"]) == pytest.approx(1 / 2)
    assert M.macro_f1(golds, golds) == 1.0


def test_macro_f1_equals_scikit_learns_with_labels_outside_the_gold_set_and_missing_predictions():
    from sklearn.metrics import f1_score  # the dev extra's reference

    rng = np.random.default_rng(0)
    for trial in range(50):
        golds = list(rng.choice(["0", "1", "2"], size=int(rng.integers(1, 40))))
        preds = list(rng.choice(["0", "1", "2", "3", ""], size=len(golds)))  # "3": outside the set; "": none
        labels = sorted(set(golds) | {p for p in preds if p})
        expected = f1_score(golds, preds, labels=labels, average="macro", zero_division=0)
        assert M.macro_f1(preds, golds) == pytest.approx(expected, abs=1e-12), trial
        if "" not in preds:  # without missing predictions, f1_score's defaults give the same
            default = f1_score(golds, preds, average="macro", zero_division=0)
            assert M.macro_f1(preds, golds) == pytest.approx(default, abs=1e-12), trial


# ---------------------------------------------------------------------------------------------------------
# Generation and language modelling
# ---------------------------------------------------------------------------------------------------------

REFS = ["the quick brown fox jumps over the lazy dog", "a journey of a thousand miles begins with one step"]


ZH_REFS = ["我爱北京天安门。", "今天的天气很好，我们去公园散步吧。"]
ZH_HYPS = ["我爱北京。", "今天天气很好，我们去公园走走吧。"]
JA_REFS = ["今日はとても良い天気ですね。", "私は東京で日本語を勉強しています。"]
JA_HYPS = ["今日は良い天気です。", "私は東京で英語を勉強しています。"]


def test_bleu_identical_and_disjoint():
    assert M.bleu(REFS, REFS)["bleu"] == pytest.approx(100.0)
    disjoint = ["zebra yak walrus vole umbrella tiger", "seven eight nine ten eleven twelve thirteen"]
    assert M.bleu(disjoint, REFS)["bleu"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        M.bleu(REFS, REFS[:1])


def test_cjk_language_by_script():
    assert M.cjk_language(ZH_REFS) == "zh"
    assert M.cjk_language(JA_REFS) == "ja"  # Japanese mixes Han with kana
    assert M.cjk_language(REFS) is None
    assert M.cjk_language(["NLP 和 AI"]) is None  # more Latin letters than Han
    assert M.cjk_language([]) is None


def test_bleu_tokenizer_from_language_name_or_references():
    ja = "ja-mecab" if M._mecab_works() else "char"
    for name in ("Chinese", "zh", "zh-CN", "zh_Hant", "中文", "Simplified Chinese", "Chinese (Traditional)"):
        assert M.bleu_tokenizer(name, REFS) == "zh", name
    for name in ("Japanese", "ja", "ja-JP", "日本語"):
        assert M.bleu_tokenizer(name, REFS) == ja, name
    # No language named: the references' script decides.
    assert M.bleu_tokenizer(None, ZH_REFS) == "zh"
    assert M.bleu_tokenizer("", JA_REFS) == ja
    assert M.bleu_tokenizer("auto", ZH_REFS) == "zh"
    assert M.bleu_tokenizer("und", REFS) == "13a"
    # A named language is trusted, whatever the references hold.
    assert M.bleu_tokenizer("German", ZH_REFS) == "13a"
    for name in (None, "English", "en", "German"):
        assert M.bleu_tokenizer(name, REFS) == "13a"


def test_bleu_chinese_uses_sacrebleu_zh():
    result = M.bleu(ZH_HYPS, ZH_REFS, "Chinese")
    assert result["bleu"] == sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score
    # 13a sees each Chinese sentence as one or two "words", which is why the tokenizer matters.
    assert result["bleu"] != pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS]).score)
    assert "|tok:zh|" in result["bleu_signature"]
    assert result["bleu_signature"].startswith("nrefs:1|") and "version:" in result["bleu_signature"]
    assert M.bleu(ZH_HYPS, ZH_REFS) == result  # found from the references without a name


def test_bleu_english_uses_13a():
    hyps = ["the quick brown fox jumped over the lazy dog", "a journey of a thousand miles starts with a step"]
    result = M.bleu(hyps, REFS, "English")
    assert result["bleu"] == sacrebleu.corpus_bleu(hyps, [REFS]).score
    assert "|tok:13a|" in result["bleu_signature"]


def test_bleu_japanese_uses_mecab_or_characters():
    result = M.bleu(JA_HYPS, JA_REFS, "ja")
    tokenize = "ja-mecab" if M._mecab_works() else "char"
    assert result["bleu"] == sacrebleu.corpus_bleu(JA_HYPS, [JA_REFS], tokenize=tokenize).score
    assert f"|tok:{tokenize}" in result["bleu_signature"]


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
    assert identical.pop("rouge_tokenize") == M.ROUGE_WORDS and set(identical) == {"rouge1", "rouge2", "rougeL"}
    for value in identical.values():
        assert value == pytest.approx(100.0)
    # Stemming: "running cats" and "run cat" have the same stems.
    assert M.rouge(["running cats"], ["run cat"])["rouge1"] == pytest.approx(100.0)
    # One example identical, one disjoint -> mean of 100 and 0.
    assert M.rouge([REFS[0], "zebra"], REFS)["rouge1"] == pytest.approx(50.0)


def test_rouge_on_chinese_counts_characters_as_rouge_score_does_on_them_spaced_out():
    """rouge_score's own tokenizer drops every Han character, so a perfect Chinese summary scored 0. Scored on
    characters, the numbers equal rouge_score's on the same texts written one character per word (the way
    Chinese summarization sets score ROUGE), with Latin words and numbers kept whole."""
    from rouge_score import rouge_scorer

    refs = ["北京是中国的首都，有21个区。", "今天的天气很好，我们去公园散步吧。", "ChatGPT在2023年很流行"]
    preds = ["北京是首都。", "今天天气好，去公园吧", "ChatGPT 2023年流行了"]
    assert M.rouge(refs, refs)["rouge1"] == pytest.approx(100.0)
    ours = M.rouge(preds, refs)
    assert ours["rouge_tokenize"] == M.ROUGE_CJK_CHARACTERS
    spaced = [
        "北 京 是 中 国 的 首 都 有 21 个 区",
        "今 天 的 天 气 很 好 我 们 去 公 园 散 步 吧",
        "chatgpt 在 2023 年 很 流 行",
    ]
    spaced_preds = ["北 京 是 首 都", "今 天 天 气 好 去 公 园 吧", "chatgpt 2023 年 流 行 了"]

    class Spaces:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Spaces())
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[key].fmeasure for r, p in zip(spaced, spaced_preds, strict=True)) / 3
        assert ours[key] == pytest.approx(100 * expected, abs=1e-9), key
    assert 0 < ours["rouge2"] < ours["rouge1"] < 100


def test_perplexity():
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert M.perplexity(1e6) == math.inf
    assert math.isnan(M.perplexity(float("nan")))
