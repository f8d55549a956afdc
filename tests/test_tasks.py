"""Finetuning task formats: parsing, loss masks, QA windows, chat turns, and one-line errors for bad options.
The files themselves, as public datasets ship them, are tests/test_task_files.py's."""

import gzip
import json
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bigmodel_cli import config, tasks
from bigmodel_cli.data import tokenizer as tokenizer_lib
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import masks
from bigmodel_cli.tasks.chat import CHAT_TEMPLATE, ChatFormat
from bigmodel_cli.tasks.options import TaskOptions, TaskWarning
from bigmodel_cli.train.preference import PreferenceConfig
from tests.conftest import REPO, synthetic_text
from tests.task_helpers import CHINESE, FILLER, qa_item, squad, write


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small real BPE tokenizer (byte fallback, so Chinese becomes byte tokens) trained on English text."""
    root = tmp_path_factory.mktemp("tok")
    text = synthetic_text(400) + (FILLER + "Paris is in France. Where does the fox live? unanswerable\n") * 20
    return tokenizer_lib.Tokenizer(tokenizer_lib.train([text, CHINESE], root / "t.model", 400, "bpe"))


def trained_text(encoded: dict, row: int, tok) -> tuple[str, bool]:
    """The decoded trained-on tokens of a row (EOS left out), and whether an EOS is trained on last."""
    weighted = encoded["targets"][row][encoded["weights"][row] > 0].tolist()
    ends_with_eos = bool(weighted) and weighted[-1] == tok.eos_id
    return tok.decode([t for t in weighted if t != tok.eos_id]).strip(), ends_with_eos


def row_tokens(encoded: dict, row: int) -> list[int]:
    return [int(encoded["inputs"][row, 0]), *encoded["targets"][row].tolist()]


# ---------------------------------------------------------------------------------------------------------
# Every task: parse, encode, mask exactly the target
# ---------------------------------------------------------------------------------------------------------


def task_files(tmp_path: Path) -> dict[str, tuple[Path, Path | None, TaskOptions]]:
    ctx = "The fox lives in the forest. The red cup belongs to Anna."
    qa = write(
        tmp_path / "qa.json",
        json.dumps(
            squad(
                [
                    (
                        ctx,
                        [
                            qa_item("q1", "Where does the fox live?", ctx, "forest"),
                            qa_item("q2", "Who owns the red cup?", ctx, "Anna"),
                        ],
                    )
                ]
            )
        ),
    )
    classify = write(tmp_path / "c.tsv", "sentence\tlabel\na fine film\t1\na dull film\t0\n")
    summarize = write(
        tmp_path / "s.jsonl",
        "\n".join(json.dumps({"document": FILLER * 3, "summary": f"A river {i}."}) for i in range(3)) + "\n",
    )
    src = write(tmp_path / "src.en", "the cat sleeps\nthe dog runs\n")
    tgt = write(tmp_path / "tgt.de", "die Katze schläft\nder Hund läuft\n")
    alpaca = write(
        tmp_path / "a.json",
        json.dumps(
            [
                {"instruction": "Add the numbers.", "input": "two plus three", "output": "five"},
                {"instruction": "Say hello.", "input": "", "output": "hello there"},
            ]
        ),
    )
    return {
        "qa": (qa, None, TaskOptions()),
        "classify": (classify, None, TaskOptions(text_field="sentence", max_target_tokens=8)),
        "summarize": (summarize, None, TaskOptions()),
        "translate": (src, tgt, TaskOptions()),
        "instruct": (alpaca, None, TaskOptions()),
    }


@pytest.mark.parametrize("task", tasks.SUPERVISED)
def test_each_task_trains_on_exactly_the_target_and_eos(task, tmp_path, tok):
    path, path2, opts = task_files(tmp_path)[task]
    examples, info = tasks.get(task).load(path, opts, path2=path2)
    assert info["task"] == task and info["examples"] == len(examples) >= 2
    enc = tasks.get(task).encode(examples, tok, 256, opts)
    masks.check_masks(enc)
    assert enc["inputs"].shape == enc["targets"].shape == enc["weights"].shape == (len(examples), 256)
    assert enc["example_index"].tolist() == list(range(len(examples)))
    prompts = tasks.get(task).generation_prompts(examples, tok, 256, opts)
    for row, example in enumerate(examples):
        text, ends_with_eos = trained_text(enc, row, tok)
        assert text.strip() == example.target.strip() and ends_with_eos
        # Nothing was cut: the row is exactly the tokenization of prompt + target, between EOS tokens, and
        # generation starts from exactly the prompt part of that row.
        natural = [tok.eos_id, *tok.encode([example.prompt + example.target])[0], tok.eos_id]
        assert row_tokens(enc, row)[: len(natural)] == natural
        assert prompts[row] == [[tok.eos_id, *tok.encode([example.prompt])[0]]]
        first_trained = int(np.argmax(enc["weights"][row] > 0)) + 1
        assert row_tokens(enc, row)[:first_trained] == prompts[row][0]
        assert not enc["weights"][row][len(natural) - 1 :].any()  # padding is never trained on


def test_show_examples_marks_the_trained_tokens(tmp_path, tok):
    path, _, opts = task_files(tmp_path)["classify"]
    examples, _ = tasks.get("classify").load(path, opts)
    shown = masks.show_examples(tasks.get("classify").encode(examples, tok, 64, opts), tok, n=1)
    assert "⟨eos⟩Text: a fine film\nLabel:⟦ 1⟨eos⟩⟧" in shown
    assert shown.startswith("--- example 0:") and shown.count("--- example") == 1


def test_check_masks_rejects_all_zero_and_all_one_masks():
    ones = {"weights": np.ones((2, 4), np.float32)}
    with pytest.raises(UserError, match="all ones"):
        masks.check_masks(ones)
    with pytest.raises(UserError, match="all zeros"):
        masks.check_masks({"weights": np.zeros((2, 4), np.float32)})
    masks.check_masks({"weights": np.array([[0, 1], [0, 0]], np.float32)})  # a padded batch is fine


# ---------------------------------------------------------------------------------------------------------
# QA
# ---------------------------------------------------------------------------------------------------------


def test_qa_windows_keep_the_answer_and_generation_sees_every_window(tmp_path, tok):
    context = FILLER * 12 + "The treasure is hidden in Lisbon. " + FILLER * 4
    data = squad([(context, [qa_item("q", "Where is the treasure?", context, "Lisbon")])])
    examples, _ = tasks.get("qa").load(write(tmp_path / "q.json", json.dumps(data)), TaskOptions())
    opts = TaskOptions(max_target_tokens=8, doc_stride=16)
    enc = tasks.get("qa").encode(examples, tok, 96, opts)
    assert len(tok.encode([context])[0]) > 3 * 96  # the context really needs windows
    window = tok.decode(row_tokens(enc, 0))
    assert "Lisbon" in window.split("Question:")[0] and trained_text(enc, 0, tok) == ("Lisbon", True)
    prompts = tasks.get("qa").generation_prompts(examples, tok, 96, opts)[0]
    assert len(prompts) > 3 and all(len(p) <= 96 - 8 for p in prompts)
    trained_prompt = row_tokens(enc, 0)[: int(np.argmax(enc["weights"][0] > 0)) + 1]
    assert trained_prompt in prompts  # training uses one of the evaluation windows
    assert tok.decode(prompts[0]).startswith("Context: The river") and tok.decode(prompts[-1]).endswith(
        "grey sky. \nQuestion: Where is the treasure?\nAnswer:"
    )


def test_qa_keeps_every_question_and_only_training_needs_the_answer_start(tmp_path, tok):
    ctx = "Paris is in France. Rome is in Italy."
    qas = [
        qa_item("good", "Where is Rome?", ctx, "Italy"),
        {"id": "bad", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 3}]},
        {
            "id": "mixed",
            "question": "Which city?",
            "answers": [{"text": "Paris", "answer_start": 9}, {"text": "Paris", "answer_start": 0}],
        },
    ]
    path = write(tmp_path / "q.json", json.dumps(squad([(ctx, qas)])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading drops nothing, so it has nothing to warn about
        examples, info = tasks.get("qa").load(path, TaskOptions())
    assert [e.id for e in examples] == ["good", "bad", "mixed"]  # evaluation generates and scores all three
    assert info["bad_answer_starts"] == 2 and info["no_answer_position"] == 1
    assert examples[1].meta["answer_start"] is None and examples[1].references == ("France",)
    assert examples[2].target == " Paris" and examples[2].references == ("Paris", "Paris")
    assert len(tasks.get("qa").generation_prompts(examples, tok, 64, TaskOptions(max_target_tokens=8))) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = tasks.get("qa").encode(examples, tok, 64, TaskOptions(max_target_tokens=8), source=str(path))
    assert enc["example_index"].tolist() == [0, 2]  # training leaves out the question it cannot place
    assert len(caught) == 1 and issubclass(caught[0].category, TaskWarning)
    message = str(caught[0].message)
    assert message.startswith(f"{path}: 1 of 3 questions left out of training") and "\n" not in message
    with pytest.raises(UserError, match="q.json: no question has an answer whose answer_start"):
        tasks.get("qa").encode(examples[1:2], tok, 64, TaskOptions(max_target_tokens=8), source=str(path))


def test_qa_v2_unanswerable_questions_train_on_the_word_unanswerable(tmp_path, tok):
    ctx = "Paris is in France."
    qas = [
        {"id": "x", "question": "Where is Rome?", "answers": [], "is_impossible": True},
        {**qa_item("y", "Where is Paris?", ctx, "France"), "is_impossible": False},
    ]
    examples, info = tasks.get("qa").load(write(tmp_path / "q.json", json.dumps(squad([(ctx, qas)]))), TaskOptions())
    assert info["squad_version"] == "2.0" and info["unanswerable"] == 1
    assert examples[0].target == " unanswerable" and examples[0].references == ()
    enc = tasks.get("qa").encode(examples, tok, 64, TaskOptions(max_target_tokens=8))
    assert trained_text(enc, 0, tok) == ("unanswerable", True)
    assert tasks.get("qa").extract_answer(" unanswerable\nmore") == ""
    assert tasks.get("qa").extract_answer(" France\nQuestion: ...") == "France"


def test_chinese_qa_windows_keep_the_answer(tmp_path, tok):
    context = CHINESE * 4 + "故宫在北京的中心。" + CHINESE * 2  # no spaces anywhere
    qas = [qa_item("c1", "故宫在哪里？", context, "北京的中心", start=len(CHINESE) * 4 + 3)]
    examples, _ = tasks.get("qa").load(
        write(tmp_path / "cmrc.json", json.dumps(squad([(context, qas)]), ensure_ascii=False)), TaskOptions()
    )
    opts = TaskOptions(max_target_tokens=24, doc_stride=32)
    enc = tasks.get("qa").encode(examples, tok, 200, opts)
    assert trained_text(enc, 0, tok) == ("北京的中心", True)
    assert "故宫在北京的中心" in tok.decode(row_tokens(enc, 0)).split("Question:")[0]
    assert len(tasks.get("qa").generation_prompts(examples, tok, 200, opts)[0]) > 1


def test_qa_file_without_questions_is_a_user_error(tmp_path):
    path = write(tmp_path / "q.json", json.dumps({"data": [{"paragraphs": [{"context": "x"}]}]}))
    with pytest.raises(UserError, match="no questions"):
        tasks.get("qa").load(path, TaskOptions())
    with pytest.raises(UserError, match="not SQuAD-format"):
        tasks.get("qa").load(write(tmp_path / "r.json", '{"data": 3}'), TaskOptions())


# ---------------------------------------------------------------------------------------------------------
# Classify, summarize, translate
# ---------------------------------------------------------------------------------------------------------


def test_classify_label_set_names_and_unseen_labels(tmp_path):
    rows = [("good", "2"), ("bad", "10"), ("meh", "2"), ("ok", "1")]
    csv_path = write(tmp_path / "c.csv", "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    examples, info = tasks.get("classify").load(csv_path, TaskOptions())
    assert info["labels"] == ["1", "2", "10"]  # numeric labels sort as numbers
    jsonl = write(tmp_path / "c.jsonl", "".join(json.dumps({"review": t, "stars": int(lab)}) + "\n" for t, lab in rows))
    named = TaskOptions(text_field="review", label_field="stars", label_names="1:poor, 2:fair, 10:great")
    examples, info = tasks.get("classify").load(jsonl, named)
    assert info["labels"] == ["fair", "great", "poor"] and examples[0].target == " fair"
    tasks.get("classify").check_labels(examples, info["labels"])
    dev, _ = tasks.get("classify").load(write(tmp_path / "dev.csv", "text,label\nnew,neutral\n"), TaskOptions())
    with pytest.raises(UserError, match="'neutral' was never seen in training"):
        tasks.get("classify").check_labels(dev, ["negative", "positive"])
    with pytest.raises(UserError, match="label '7' is not in task.label_names"):
        tasks.get("classify").load(write(tmp_path / "x.csv", "text,label\na,7\n"), TaskOptions(label_names="1:x"))
    with pytest.raises(UserError, match="task.label_names must look like"):
        TaskOptions(label_names="0=negative")


def test_long_documents_are_cut_and_long_targets_lose_their_eos(tmp_path, tok):
    records = [{"document": FILLER * 40, "summary": "short one"}, {"document": "tiny", "summary": FILLER * 5}]
    path = write(tmp_path / "s.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    examples, _ = tasks.get("summarize").load(path, TaskOptions())
    opts = TaskOptions(max_target_tokens=16)
    with pytest.warns(TaskWarning) as caught:
        enc = tasks.get("summarize").encode(examples, tok, 64, opts, source=str(path))
    assert [str(w.message) for w in caught] == [f"{path}: 1 targets cut to task.max_target_tokens=16"]
    assert enc["weights"][0].any() and trained_text(enc, 0, tok) == ("short one", True)
    assert tok.decode(row_tokens(enc, 0)).rstrip().endswith("Summary: short one")
    text, ends_with_eos = trained_text(enc, 1, tok)
    assert not ends_with_eos and FILLER.startswith(text) and int(enc["weights"][1].sum()) == 16


def test_translate_two_files_gzip_jsonl_and_mismatch(tmp_path, tok):
    src = tmp_path / "train.en.gz"
    tgt = tmp_path / "train.de.gz"
    src.write_bytes(gzip.compress(b"a man walks\n\ntwo dogs play\n"))
    tgt.write_bytes(gzip.compress("ein Mann geht\nleer\nzwei Hunde spielen schön\n".encode()))
    opts = TaskOptions(source_lang="English", target_lang="German")
    with pytest.warns(TaskWarning, match="1 pairs with an empty"):
        examples, info = tasks.get("translate").load(src, opts, path2=tgt)
    assert [e.references for e in examples] == [("ein Mann geht",), ("zwei Hunde spielen schön",)]
    assert examples[0].prompt == "Translate English to German.\nEnglish: a man walks\nGerman:"
    jsonl = write(tmp_path / "t.jsonl", json.dumps({"en": "hello", "fr": "bonjour"}) + "\n")
    examples, _ = tasks.get("translate").load(jsonl, TaskOptions(source_field="en", target_field="fr"))
    assert examples[0].target == " bonjour"
    write(tmp_path / "short.de", "eins\n")
    with pytest.raises(UserError, match="has 3 lines but .* has 1: the two translate files must be line-aligned"):
        tasks.get("translate").load(src, opts, path2=tmp_path / "short.de")
    with pytest.raises(UserError, match="pass the target-language file as the second path"):
        tasks.get("translate").load(write(tmp_path / "only.en", "hi\n"), opts)


# ---------------------------------------------------------------------------------------------------------
# Instruct
# ---------------------------------------------------------------------------------------------------------


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tmp_path, tok):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "two plus two?"},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "and three more?"},
            {"role": "assistant", "content": "seven"},
            {"role": "user", "content": "ignored: nothing answers it"},
        ]
    }
    no_reply = {"messages": [{"role": "user", "content": "hello?"}]}
    path = write(tmp_path / "chat.jsonl", json.dumps(chat) + "\n\n" + json.dumps(no_reply) + "\n")
    with pytest.warns(TaskWarning, match="skipped 1 records with no .non-empty. assistant reply"):
        examples, info = tasks.get("instruct").load(path, TaskOptions())
    assert info["skipped_empty"] == 1 and len(examples) == 1
    example = examples[0]
    assert example.target == "seven<|end|>" and example.references == ("seven",)
    assert example.prompt.endswith("<|user|>\nand three more?<|end|>\n<|assistant|>\n")
    enc = tasks.get("instruct").encode(examples, tok, 256, TaskOptions())
    shown = masks.show_examples(enc, tok)
    assert shown.split("\n", 1)[1].count("⟦") == 2 and "<|assistant|>\n⟦four<|end|>⟧\n<|user|>" in shown
    assert shown.endswith("<|assistant|>\n⟦seven<|end|>⟨eos⟩⟧") and "ignored" not in shown
    assert tasks.get("instruct").extract_answer("seven<|end|>\n<|user|>") == "seven"


def test_the_builtin_chat_template_renders_the_same_with_and_without_trim_blocks():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Template(CHAT_TEMPLATE)  # no trim_blocks: a literal newline after a tag would survive here
    render_chat = ChatFormat(CHAT_TEMPLATE).render  # transformers' settings
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    for msgs in (messages, messages[:2], []):
        for gen in (False, True):
            assert template.render(messages=msgs, add_generation_prompt=gen) == render_chat(msgs, gen)
    assert render_chat(messages[:2], True) == "<|system|>\ns<|end|>\n<|user|>\nu<|end|>\n<|assistant|>\n"


def test_alpaca_records_become_a_user_turn_and_a_reply(tmp_path, tok):
    path, _, opts = task_files(tmp_path)["instruct"]
    examples, _ = tasks.get("instruct").load(path, opts)
    assert examples[0].prompt == "<|user|>\nAdd the numbers.\n\ntwo plus three<|end|>\n<|assistant|>\n"
    assert examples[1].prompt == "<|user|>\nSay hello.<|end|>\n<|assistant|>\n"
    assert examples[1].target == "hello there<|end|>"


# ---------------------------------------------------------------------------------------------------------
# Bad options and lengths: one-line UserErrors naming the problem and the fix
# ---------------------------------------------------------------------------------------------------------


def test_unknown_task_bad_options_and_too_small_seq_len(tmp_path, tok):
    with pytest.raises(
        UserError, match="unknown task 'chat': choose one of qa, classify, summarize, translate, instruct"
    ):
        tasks.get("chat")
    with pytest.raises(UserError, match="task.doc_stride must be positive"):
        TaskOptions(doc_stride=0)
    path, _, opts = task_files(tmp_path)["qa"]
    examples, _ = tasks.get("qa").load(path, opts)
    with pytest.raises(UserError, match="raise data.seq_len or lower task.max_target_tokens"):
        tasks.get("qa").encode(examples, tok, 64, opts)
    with pytest.raises(UserError, match="no example fits data.seq_len=24"), pytest.warns(TaskWarning):
        tasks.get("qa").encode(examples, tok, 24, TaskOptions(max_target_tokens=4))
    no_eos = SimpleNamespace(eos_id=-1, encode=tok.encode, path="llama.model")
    with pytest.raises(UserError, match="llama.model has no EOS token"):
        tasks.get("qa").encode(examples, no_eos, 256, opts)


# ---------------------------------------------------------------------------------------------------------
# Recipes and the synthetic QA generator
# ---------------------------------------------------------------------------------------------------------

FINETUNE_RECIPES = sorted((REPO / "recipes" / "finetune").glob("*.toml"))


def test_there_is_a_finetune_recipe_per_task():
    assert sorted(p.stem for p in FINETUNE_RECIPES) == sorted(tasks.NAMES)


@pytest.mark.parametrize("recipe", FINETUNE_RECIPES, ids=lambda p: p.stem)
def test_finetune_recipes_parse(recipe):
    text = recipe.read_text()
    assert text.startswith("#") and f"--task {recipe.stem}" in text.split("\n\n")[0]
    raw = tomllib.loads(text)
    TaskOptions(**raw.pop("task", {}))  # unknown keys or bad values raise
    PreferenceConfig(**raw.pop("preference", {}))
    raw.pop("lora", None)
    assert "model" not in raw, "the model comes from the starting checkpoint"
    cfg = config.build_config(raw, {}, config.Config, recipe.parent)
    assert cfg.train.steps > 0 and cfg.data.seq_len >= 0  # 0 = the starting model's max_seq_len


def test_synthetic_qa_is_deterministic_learnable_squad(tmp_path):
    script = REPO / "scripts" / "make_synthetic_qa.py"
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = [sys.executable, script, "--seed", "3", "--n-train", "40", "--n-test", "10", "--n-corpus", "50"]
        subprocess.run([*args, "--out", out], check=True, capture_output=True)
        outs.append(out)
    for file in ("train.json", "test.json", "corpus.txt"):
        assert (outs[0] / file).read_bytes() == (outs[1] / file).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every answer_start must match
        train, info = tasks.get("qa").load(outs[0] / "train.json", TaskOptions())
        test, _ = tasks.get("qa").load(outs[0] / "test.json", TaskOptions())
    assert (len(train), len(test)) == (40, 10) and info["bad_answer_starts"] == 0
    assert not {e.meta["context"] for e in train} & {e.meta["context"] for e in test}
    corpus = (outs[0] / "corpus.txt").read_text()
    assert len(corpus.splitlines()) == 50 and "Answer:" not in corpus
    held_out = {e.meta["context"] for e in test}
    assert not any(line.startswith(ctx + " ") for line in corpus.splitlines() for ctx in held_out)
