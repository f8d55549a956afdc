"""Task files as public datasets ship them: compressed, with empty fields (CMRC 2018, AG News, Tatoeba, Alpaca
shapes), without a header row, and one-line errors for the ones that cannot be read."""

import bz2
import gzip
import json
import lzma
import re
import warnings
from pathlib import Path

import pytest

from bigmodel_cli import tasks
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks.options import TaskOptions, TaskWarning
from tests.conftest import synthetic_text
from tests.task_helpers import CHINESE, FILLER, qa_item, squad, write

COMPRESSORS = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda raw: pytest.importorskip("zstandard").ZstdCompressor().compress(raw),
}


@pytest.mark.parametrize("ext", list(COMPRESSORS))
@pytest.mark.parametrize("task, name", [("qa", "qa.json"), ("classify", "c.csv"), ("summarize", "s.jsonl")])
def test_a_compressed_task_file_reads_like_the_plain_one(task, name, ext, tmp_path):
    rows = [("a fine film", "1"), ("a dull film", "0"), ("a film, with a comma", "1")]
    plain = {
        "qa": json.dumps(squad([(FILLER, [qa_item("q1", "What runs?", FILLER, "river")])])),
        "classify": "\ufefftext,label\r\n" + "".join(f'"{t}",{lab}\r\n' for t, lab in rows),  # BOM, CRLF
        "summarize": "".join(json.dumps({"document": t, "summary": lab}) + "\n" for t, lab in rows),
    }[task]
    path = write(tmp_path / name, plain)
    packed = tmp_path / (name + ext)
    packed.write_bytes(COMPRESSORS[ext](path.read_bytes()))
    examples, info = tasks.get(task).load(path, TaskOptions())
    unpacked, unpacked_info = tasks.get(task).load(packed, TaskOptions())
    assert unpacked == examples and [e.meta for e in unpacked] == [e.meta for e in examples]
    assert {**unpacked_info, "path": str(path)} == info
    if task == "classify":
        assert [e.prompt for e in examples][2] == "Text: a film, with a comma\nLabel:" and info["labels"] == ["0", "1"]


@pytest.mark.parametrize("ext", list(COMPRESSORS))
def test_a_truncated_compressed_task_file_is_one_line_user_error(ext, tmp_path):
    records = "".join(json.dumps({"document": synthetic_text(3), "summary": f"s{i}"}) + "\n" for i in range(400))
    packed = COMPRESSORS[ext](records.encode())
    path = tmp_path / f"s.jsonl{ext}"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(UserError, match=f"s.jsonl{re.escape(ext)} is not a valid {re.escape(ext)} file") as err:
        tasks.get("summarize").load(path, TaskOptions())
    assert "\n" not in str(err.value)
    path.write_bytes(b"not compressed at all\n" * 10)
    with pytest.raises(UserError, match=f"is not a valid {re.escape(ext)} file"):
        tasks.get("summarize").load(path, TaskOptions())


# ---------------------------------------------------------------------------------------------------------
# Real data: empty fields (CMRC 2018, AG News, Tatoeba, Alpaca shapes) and CSV/TSV files without a header row
# ---------------------------------------------------------------------------------------------------------


def empty_field_files(tmp_path: Path) -> dict[str, tuple[Path, Path | None, TaskOptions, str]]:
    """Per task: a file in a public dataset's shape with empty required fields, and the one warning expected."""
    cmrc = {
        "version": "v1.0",
        "data": [
            {
                "id": f"TRAIN_{n}",
                "title": "长城",
                "paragraphs": [
                    {
                        "id": f"TRAIN_{n}",
                        "context": CHINESE,
                        "qas": [
                            {
                                "id": f"TRAIN_{n}_QUERY_{k}",
                                "question": q,
                                "answers": [{"text": "北京", "answer_start": 0}],
                            }
                            for k, q in qs
                        ],
                    }
                ],
            }
            for n, qs in ((186, [(0, "中国的首都是哪里？"), (3, "")]), (20, [(1, "  "), (2, "长城长吗？")]))
        ],
    }
    qa = write(tmp_path / "cmrc2018_train.json", json.dumps(cmrc, ensure_ascii=False))
    ag = write(
        tmp_path / "ag_news.csv",
        '"3","Wall St. Bears Claw Back","Reuters - Short-sellers are seeing green again."\n'
        '"2","Title only",""\n"1","Talks resume","Diplomats met again on Monday."\n',
    )
    docs = [{"id": f"x{i}", "document": FILLER if i else "", "summary": f"A river {i}."} for i in range(1, 4)]
    docs[0]["document"] = ""
    summarize = write(tmp_path / "s.jsonl", "".join(json.dumps(r) + "\n" for r in docs))
    zh = write(tmp_path / "tatoeba.zh", "我们走吧。\n你好。\n他在看书。\n")
    en = write(tmp_path / "tatoeba.en", "Let's go.\n\nHe is reading a book.\n")
    alpaca = [
        {"instruction": "Say hello.", "input": "", "output": "hello"},
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": ""},
        {"instruction": "", "input": "some input", "output": "an answer"},
        {"instruction": "Name a colour.", "input": "", "output": "red"},
    ]
    instruct = write(tmp_path / "alpaca_data.json", json.dumps(alpaca))
    return {
        "qa": (
            qa,
            None,
            TaskOptions(),
            "2 questions with an empty question (ids: TRAIN_186_QUERY_3, TRAIN_20_QUERY_1)",
        ),
        "classify": (ag, None, TaskOptions(columns="label,title,text"), "1 rows with an empty text (lines: 2)"),
        "summarize": (summarize, None, TaskOptions(), "1 records with an empty document (ids: x1)"),
        "translate": (
            zh,
            en,
            TaskOptions(source_lang="Chinese", target_lang="English"),
            "1 pairs with an empty English line (lines: 2)",
        ),
        "instruct": (
            instruct,
            None,
            TaskOptions(),
            "2 records with an empty output or an empty instruction (ids: 2, 3)",
        ),
    }


@pytest.mark.parametrize("task", tasks.SUPERVISED)
def test_empty_required_fields_are_skipped_with_one_warning_naming_the_file(task, tmp_path):
    path, path2, opts, expected = empty_field_files(tmp_path)[task]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, info = tasks.get(task).load(path, opts, path2=path2)
    assert [str(w.message) for w in caught] == [f"{path}: skipped {expected}"]
    assert all(issubclass(w.category, TaskWarning) for w in caught)
    assert info["skipped_empty"] == int(expected.split()[0]) and len(examples) == 2


AG_NEWS_ROWS = [
    ("3", "Wall St. Bears Claw Back Into the Black (Reuters)", "Reuters - Short-sellers are seeing green again."),
    ("4", "New chip is fast", "The company said the chip doubles the speed, at half the power."),
    ("1", "Talks resume", "Diplomats met again on Monday, a spokesman said."),
    ("2", "Late goal wins it", "The home side scored in the last minute to win the cup."),
]


def test_headerless_ag_news_csv_and_tsv_read_with_task_columns(tmp_path):
    csv_text = "".join(",".join(f'"{cell}"' for cell in row) + "\n" for row in AG_NEWS_ROWS)
    tsv_text = "".join("\t".join(row) + "\n" for row in AG_NEWS_ROWS)
    opts = TaskOptions(columns="label,title,text")  # text_field and label_field keep their defaults
    for path in (write(tmp_path / "train.csv", csv_text), write(tmp_path / "train.tsv", tsv_text)):
        examples, info = tasks.get("classify").load(path, opts)
        assert info["labels"] == ["1", "2", "3", "4"]  # from the data, sorted as numbers
        assert [e.id for e in examples] == ["1", "2", "3", "4"]  # line numbers: the first row is data
        assert examples[0].prompt == f"Text: {AG_NEWS_ROWS[0][2]}\nLabel:" and examples[0].target == " 3"
    titled, _ = tasks.get("classify").load(
        tmp_path / "train.tsv", TaskOptions(columns=opts.columns, text_field="title")
    )
    assert titled[1].references == ("4",) and "New chip is fast" in titled[1].prompt
    with_header = write(tmp_path / "h.tsv", "label\ttitle\ttext\n" + tsv_text)
    examples, _ = tasks.get("classify").load(with_header, opts)
    assert len(examples) == 4  # a header row that repeats task.columns is not read as data
    with pytest.raises(UserError, match=r"task.columns \(label,title,body\) has no 'text'.*task.text_field"):
        tasks.get("classify").load(tmp_path / "train.tsv", TaskOptions(columns="label,title,body"))
    with pytest.raises(UserError, match="task.columns must be distinct names"):
        TaskOptions(columns="label,,text")


@pytest.mark.parametrize(
    "name, content, guess",
    [
        ("ag_news.csv", "".join(",".join(f'"{c}"' for c in row) + "\n" for row in AG_NEWS_ROWS), "label,col2,text"),
        ("ag_news.tsv", "".join("\t".join(row) + "\n" for row in AG_NEWS_ROWS), "label,col2,text"),
        ("sst2.tsv", "hide new secretions from the parental units\t0\ncontains no wit\t0\n", "text,label"),
    ],
)
def test_a_file_without_header_row_is_one_error_naming_the_columns_option(name, content, guess, tmp_path):
    path = write(tmp_path / name, content)
    with pytest.raises(UserError) as err:
        tasks.get("classify").load(path, TaskOptions())
    message = str(err.value)
    assert message.startswith(f"{path} seems to have no header row") and "\n" not in message
    assert f"--columns {guess} (or --set task.columns={guess})" in message
    examples, info = tasks.get("classify").load(path, TaskOptions(columns=guess))
    assert len(examples) == len(content.splitlines()) and info["labels"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors naming the problem and the fix
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, name, content, message",
    [
        ("qa", "missing.json", None, "not found: pass an existing"),
        ("qa", "empty.json", "  \n", "is empty"),
        ("summarize", "bad.jsonl", '{"document": "d", "summary": "s"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
        (
            "summarize",
            "s.jsonl",
            '{"text": "d", "summary": "s"}\n',
            r"s.jsonl:1: no field 'document' .*task.document_field",
        ),
        (
            "classify",
            "c.tsv",
            "sentence\tlabel\nx\t1\n",
            r"no field 'text' \(fields: sentence, label\): set task.text_field",
        ),
        ("classify", "c.txt", "x\n", "must be .jsonl, .csv or .tsv"),
        ("instruct", "i.jsonl", '{"instruction": "x", "input": ""}\n', "no field 'output'"),
        ("instruct", "r.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', "each message needs a role"),
        ("qa", "q.json", '{"data": [', r"q.json:1: not valid JSON"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(task, name, content, message, tmp_path):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(UserError, match=message) as err:
        tasks.get(task).load(path, TaskOptions())
    assert "\n" not in str(err.value)


def test_line_and_paragraph_separators_inside_records_do_not_split_them(cli, tmp_path):
    """JSON Lines and line-aligned files end their lines at "\\n" only: a summary holding U+2028 (json.dumps with
    ensure_ascii=False writes it raw), a sentence holding U+0085 or a form feed stays one record."""
    summaries = ["The ferry\u2028sank.", "No one\x85was hurt.", "Rain\x0cfell."]
    rows = [{"document": FILLER, "summary": s} for s in summaries]
    data = write(tmp_path / "s.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    examples, _ = tasks.get("summarize").load(data, TaskOptions())
    assert [e.references[0] for e in examples] == summaries
    preds = [{"id": e.id, "prediction": s} for e, s in zip(examples, summaries, strict=True)]
    write(tmp_path / "p.jsonl", "\ufeff" + "".join(json.dumps(p, ensure_ascii=False) + "\r\n" for p in preds))  # BOM
    scored = cli("evaluate", "--task", "summarize", "--data", data, "--predictions", tmp_path / "p.jsonl", "--json")
    assert json.loads(scored.stdout.splitlines()[-1])["rouge1"] == pytest.approx(100)
    english = write(tmp_path / "en.txt", "The ferry sank.\nNo one was hurt.\nIt rained.\n")
    german = write(tmp_path / "de.txt", "Die Fähre\u2028sank.\nNiemand\x85wurde verletzt.\nEs\x0cregnete.\n")
    pairs, _ = tasks.get("translate").load(english, TaskOptions(), path2=german)
    assert len(pairs) == 3 and pairs[2].references[0] == "Es\x0cregnete."


def test_examples_sharing_an_id_or_a_null_prediction_are_refused_in_one_line(cli, tmp_path):
    rows = [{"id": "x", "document": FILLER, "summary": "A river."}, {"id": "x", "document": CHINESE, "summary": "城"}]
    data = write(tmp_path / "s.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    preds = write(tmp_path / "p.jsonl", json.dumps({"id": "x", "prediction": "A river."}) + "\n")
    args = ("evaluate", "--task", "summarize", "--data", data, "--predictions", preds)
    refused = cli(*args, ok=False)
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        f"error: {data}: examples 1 and 2 both have the id 'x', and predictions are matched by id: give every one its "
        "own id (one without an id is numbered by its position)"
    ]
    write(data, "".join(json.dumps({**r, "id": str(i)}, ensure_ascii=False) + "\n" for i, r in enumerate(rows)))
    write(preds, '{"id": "0", "prediction": null}\n{"id": "1", "prediction": "城"}\n')
    null = cli(*args, ok=False)
    assert null.exit_code == 2 and null.stderr.strip().splitlines() == [
        f'error: {preds}:1: the prediction is null, not text: write "" for no answer'
    ]
