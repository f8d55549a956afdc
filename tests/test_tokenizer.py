"""Tokenizer round trips: decode(encode(text)) == text for every model type, whether trained on Chinese text
without a single ASCII space or on English; and the documented exceptions (a literal "▁", normalising models)."""

import io
import json

import pytest
import sentencepiece as spm
import tokenizers

from bigmodel_cli import tasks
from bigmodel_cli.data import tokenizer as tok
from bigmodel_cli.data import tokenizer_formats
from bigmodel_cli.tasks import layout

# Newspaper-style Chinese (full-width punctuation, Arabic digits, no ASCII space anywhere), and plain English.
CHINESE_LINES = [
    "新华社北京3月5日电，第十四届全国人民代表大会第二次会议今天上午在人民大会堂开幕。",
    "国务院总理作政府工作报告，提出今年国内生产总值增长预期目标为5%左右。",
    "记者从国家统计局获悉，全国粮食总产量连续9年稳定在1.3万亿斤以上。",
    "本报讯，首都机场新航站楼正式投入使用，旅客从安检到登机平均只需4分钟。",
    "铁路部门表示，春运期间全国铁路累计发送旅客超过4.8亿人次，同比增长近四成。",
    "人民日报评论员文章指出，要坚持以人民为中心的发展思想，推动经济社会高质量发展。",
    "据气象台预报，明天白天北京晴转多云，最高气温12℃，北风二三级。",
    "教育部发布通知，要求各地切实减轻中小学生课业负担，保障学生每天睡眠时间。",
]
ENGLISH_LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Stocks rose on Monday as investors weighed new data on inflation and jobs.",
    "The council voted to build a new library, which will open in two years.",
    "Rain is expected across the north tomorrow, with strong winds along the coast.",
]
VOCAB = {"zh": 460, "en": 320}  # bpe and unigram: 256 bytes, ~200 characters (zh) and some merges; char sizes itself

SPACES = [
    " 4分钟",  # a CMRC answer after "Answer:": every prediction used to begin with a literal "▁"
    "  two  spaces\tand\ttabs\n\nand newlines  ",
    " leading",
    "trailing ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    "a\r\nb\r\n",
    "中 国 人 民",  # spaces between Chinese characters
    "\n 新华社\t北京 \n",
    "",
]
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "据气象台预报，明天白天北京晴转多云，最高气温12℃。",
    "Context: 新华社北京3月5日电 2024年\nQuestion: 需要多久？\nAnswer: 4分钟",
    "mixed 中文 and English, emoji 🍕 and Ωmega ≠ 漢字",
    *SPACES,
]


@pytest.fixture(
    scope="module",
    params=[(kind, corpus) for kind in tok.MODEL_TYPES for corpus in ("zh", "en")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def trained(request, tmp_path_factory) -> tuple[str, str, tok.Tokenizer]:
    """(model type, corpus, tokenizer) for each model type trained on each corpus, once per module."""
    kind, corpus = request.param
    lines = CHINESE_LINES if corpus == "zh" else ENGLISH_LINES
    path = tmp_path_factory.mktemp("tok") / f"{kind}-{corpus}.model"
    return kind, corpus, tok.Tokenizer(tok.train(lines * 3, path, VOCAB[corpus], kind))


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_encode_round_trips(trained, text):
    kind, corpus, tk = trained
    ids = tk.encode([text])[0]
    assert tk.sp.unk_id() not in ids, (kind, corpus, text)
    assert tk.decode(ids) == text, (kind, corpus)


def test_every_tokenizer_has_a_space_piece_and_chinese_corpora_encode_a_space_as_one_token(trained):
    kind, corpus, tk = trained
    space = tk.sp.piece_to_id(tok.SPACE_PIECE)
    assert space != tk.sp.unk_id() and not tk.sp.is_byte(space)
    if corpus == "zh":  # no space in the corpus: the piece exists anyway, and is a space's only token
        zhong, guo = tk.encode(["中", "国"])
        assert tk.encode([" 4分钟"])[0][0] == space and tk.encode(["中 国"])[0] == [*zhong, space, *guo]


def test_encode_takes_a_list_and_matches_one_by_one(trained):
    _, _, tk = trained
    batch = tk.encode(SAMPLES)
    assert batch == [tk.encode([text])[0] for text in SAMPLES]
    assert [tk.decode(ids) for ids in batch] == SAMPLES


def test_char_vocabulary_is_the_corpus_characters_plus_bytes(tmp_path):
    chars = set("".join(CHINESE_LINES))
    with_bytes = tok.Tokenizer(tok.train(CHINESE_LINES, tmp_path / "a.model", 0, "char"))
    # specials, newline, "▁" (there even though the corpus has no space) and the 256 byte pieces
    assert with_bytes.vocab_size == len(chars) + 4 + 1 + 1 + 256
    plain = tok.Tokenizer(tok.train(CHINESE_LINES, tmp_path / "b.model", 0, "char", byte_fallback=False))
    assert plain.vocab_size == len(chars) + 6
    # Without byte fallback spaces still round-trip; characters outside the corpus become one <unk>, " ⁇ ".
    assert plain.decode(plain.encode([" 4分钟\n中 国"])[0]) == " 4分钟\n中 国"
    assert plain.decode(plain.encode(["4分钟 ok"])[0]) == "4分钟" + " " + " ⁇ "


@pytest.mark.parametrize("kind", tok.MODEL_TYPES)
def test_a_literal_space_piece_in_text_decodes_as_a_space(tmp_path, kind):
    """Documented exception: SentencePiece writes spaces as U+2581 before encoding, so the two are one."""
    tk = tok.Tokenizer(tok.train(CHINESE_LINES * 3, tmp_path / "t.model", VOCAB["zh"], kind))
    assert tk.encode(["a▁b"])[0] == tk.encode(["a b"])[0]
    assert tk.decode(tk.encode(["▁4分钟"])[0]) == " 4分钟"


def _sentencepiece_defaults(**options) -> spm.SentencePieceProcessor:
    """A BPE model trained by SentencePiece itself, in its own default conventions unless overridden."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHINESE_LINES + ENGLISH_LINES),
        model_writer=model,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_a_normalising_model_from_elsewhere_folds_text_as_documented():
    """SentencePiece's defaults (nmt_nfkc, extra whitespace removed, dummy prefix) do not round-trip."""
    sp = _sentencepiece_defaults()
    cases = {
        "全角，标点：４ ﬁ ①": "全角,标点:4 fi 1",  # NFKC: full-width punctuation and digits, ligatures
        "  two  spaces\tand\ttabs\r\nlines  ": "two spaces and tabs lines",  # whitespace collapsed, ends trimmed
        " 4分钟": "4分钟",
        "a▁b": "a b",
    }
    assert {text: sp.decode(sp.encode(text)) for text in cases} == cases


def test_a_llama_style_model_with_a_dummy_prefix_round_trips():
    """Identity rules and a dummy-prefix space (Llama 1 and 2): the decoder drops the space it added."""
    sp = _sentencepiece_defaults(normalization_rule_name="identity", remove_extra_whitespaces=False)
    for text in SAMPLES:
        assert sp.decode(sp.encode(text)) == text


def test_qa_parts_cut_from_the_whole_keep_the_answer_text(trained):
    """Finetuning encodes prompt and target as cuts of the whole text: the parts decode to the whole, and the
    target to the answer with its leading space (extract_answer strips it), not "▁4分钟"."""
    _, _, tk = trained
    parts = ["Context:", " 新华社北京3月5日电，旅客平均只需4分钟。", "\nQuestion: 需要多久？\nAnswer:", " 4分钟"]
    (cut,) = layout._tokenize_parts(tk, [parts])
    assert [i for part in cut for i in part] == tk.encode(["".join(parts)])[0]
    assert tk.decode([i for part in cut for i in part]) == "".join(parts)
    assert tasks.get("qa").extract_answer(tk.decode(cut[-1])) == "4分钟"


def test_hugging_face_tokenizer_json_encodes_and_decodes_the_same(trained):
    kind, corpus, tk = trained
    fast = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_formats.tokenizer_json(tk.path.read_bytes())))
    for text in SAMPLES:
        ids = tk.encode([text])[0]
        assert fast.encode(text, add_special_tokens=False).ids == ids, (kind, corpus, text)
        assert fast.decode(ids, skip_special_tokens=False) == text, (kind, corpus, text)
