"""Multiple-choice benchmark files: their layouts, and the prompts lm-evaluation-harness's default templates
build from them (docs/evaluation.md, "Multiple choice").

Every layout becomes items of (query, choices, gold): the query is the prompt up to the answer (the harness's
doc_to_text), each choice is scored as the continuation " " + choice (its target delimiter), and few-shot
examples come before the query as query + " " + gold choice + "\\n\\n" (its fewshot delimiter).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import records

LAYOUTS = ("mmlu", "arc", "hellaswag", "plain")
# Layouts whose harness tasks (mmlu, ceval, cmmlu) take the first k few-shot examples in file order (first_n)
# rather than a seeded random draw: a seed means nothing for them.
FIRST_N_LAYOUTS = ("mmlu",)
TARGET_DELIMITER = " "  # between a query and the choice scored after it
FEWSHOT_DELIMITER = "\n\n"  # after each few-shot example
ANSWER_CUE = "Answer:"  # MMLU's query ends with this
ANSWER_CUE_ZH = "答案："  # C-Eval's and CMMLU's with this: used when the questions hold Chinese text
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")  # a headerless MMLU row
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_SUBJECT_FILE = re.compile(r"^(.+)_(?:test|dev|val)\.(?:csv|tsv)$")


@dataclass(frozen=True)
class ChoiceItem:
    """One question: where it came from, its query (the prompt without the answer), choices and the gold index."""

    where: str  # file:line, for messages and predictions.jsonl
    record: dict[str, Any]  # the row as read: the harness leaves out of an item's shots the rows equal to it
    query: str = ""
    choices: tuple[str, ...] = ()
    gold: int = 0
    description: str = ""  # the task description that opens the prompt, before any few-shot example (MMLU)


def _bad(where: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem}")


def _gold_index(where: str, answer: Any, choices: list[str], labels: list[str]) -> int:
    """The gold choice's index from an answer given as an index, a label (A, B, ...) or a choice's text."""
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise _bad(where, "missing answer: give every row its answer (an index, a label or a choice's text)")
    if isinstance(answer, bool):
        raise _bad(where, f"answer {answer!r} is not an index, a label or a choice: fix the row")
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return answer
        raise _bad(where, f"answer index {answer} is not among the {len(choices)} choices (0-{len(choices) - 1})")
    text = str(answer).strip()
    if text in labels:
        return labels.index(text)
    if text in choices:
        return choices.index(text)
    shown = ", ".join(labels) if labels else ", ".join(repr(c) for c in choices[:4])
    raise _bad(where, f"answer {text!r} is not among the choices ({shown}): fix the row's answer")


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _check_choices(where: str, choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise _bad(where, "empty choices list: give the row at least one choice")
    if any(not isinstance(c, str) or not c for c in choices):
        raise _bad(where, "every choice must be a non-empty string: fix the row's choices")
    return choices


# --- MMLU, C-Eval, CMMLU: CSV rows of question, A, B, C, D, answer -------------------------------------------


def _csv_rows(path: Path, columns: str | None) -> list[tuple[str, dict]]:
    """(where, row) of a question/A/B/C/D/answer CSV: named by its header, by --columns, or MMLU's six columns."""
    text = records.read_text(path, "choice data")
    delimiter = "\t" if records.file_kind(path) == "tsv" else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    # A row is named by the line it starts on: a quoted cell may hold newlines (MMLU's questions do).
    rows, line = [], 1
    for cells in reader:
        rows += [(line, cells)] if cells else []
        line = reader.line_num + 1
    if columns:
        names = [c.strip() for c in columns.split(",")]
        if rows and [c.strip() for c in rows[0][1]] == names:
            rows = rows[1:]
    elif rows and {"question", "answer", "a", "b"} <= {c.strip().lower() for c in rows[0][1]}:
        names, rows = [c.strip() for c in rows[0][1]], rows[1:]  # C-Eval: id,question,A..D,answer; CMMLU: ,Question,...
    elif rows and len(rows[0][1]) == len(MMLU_COLUMNS):
        names = list(MMLU_COLUMNS)  # MMLU's own files have no header row
    else:
        raise UserError(
            f"{path}: a choice CSV needs a header with question, A, B, C, D and answer columns, or MMLU's six "
            "headerless columns: add a header, or name its columns with --columns"
        )
    if not _letter_columns(names) or not {"question", "answer"} <= {n.lower() for n in names}:
        raise UserError(f"{path}: columns {', '.join(names)} lack question, A-D or answer: name them with --columns")
    return [(f"{path}:{n}", dict(zip(names, [*cells, *[""] * len(names)], strict=False))) for n, cells in rows]


def _letter_columns(names) -> list[str]:
    """The option columns of an MMLU-layout row, A, B, ... as named there (any case)."""
    lower = {str(name).lower(): name for name in names}
    return [lower[letter.lower()] for letter in _letters(26) if letter.lower() in lower]


def mmlu_description(subject: str) -> str:
    """The harness's MMLU task description: a line naming the subject, then a blank line."""
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def _mmlu_item(where: str, row: dict, cue: str, subject: str = "") -> ChoiceItem:
    """An MMLU-layout row: question, A..D (or MMLU's Hub rows: a choices list and an answer index), answer."""
    lower = {str(k).lower(): k for k in row}
    if isinstance(row.get("choices"), list):  # cais/mmlu as exported from the Hub
        options = _check_choices(where, row["choices"])
    else:
        options = [row[k] for k in _letter_columns(row)]
    letters = _letters(len(options))
    question = str(row.get(lower.get("question"), ""))
    answer = row.get(lower.get("answer"))
    answer = answer.strip().upper() if isinstance(answer, str) and len(answer.strip()) == 1 else answer
    gold = _gold_index(where, answer, letters, letters)
    listed = "".join(f"\n{k}. {v}" for k, v in zip(letters, options, strict=True))
    subject = str(row.get("subject") or subject)
    description = mmlu_description(subject) if subject and cue == ANSWER_CUE else ""
    return ChoiceItem(where, row, f"{question.strip()}{listed}\n{cue}", tuple(letters), gold, description)


# --- ARC, HellaSwag, plain: JSONL --------------------------------------------------------------------------


def _arc_item(where: str, row: dict) -> ChoiceItem:
    choices = row.get("choices")
    if not isinstance(choices, dict):
        raise _bad(where, "no 'choices' object with 'text' and 'label' lists: fix the row")
    texts, labels = _check_choices(where, choices.get("text")), choices.get("label") or []
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise _bad(where, "choices.label must list one label per choices.text entry: fix the row")
    key = row.get("answerKey")
    if key is None or not str(key).strip():
        raise _bad(where, "missing answer: the row has no answerKey")
    if str(key).strip() not in [str(label) for label in labels]:
        raise _bad(where, f"answerKey {key!r} is not among the choice labels ({', '.join(map(str, labels))})")
    gold = [str(label) for label in labels].index(str(key).strip())
    return ChoiceItem(where, row, f"Question: {row.get('question', '')}\nAnswer:", tuple(texts), gold)


def hellaswag_clean(text: str) -> str:
    """HellaSwag's text clean-up in the harness: strip, WikiHow's [title] markers to '. ', drop [...]."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_item(where: str, row: dict) -> ChoiceItem:
    endings = _check_choices(where, row.get("endings"))
    if "ctx_a" in row:
        context = f"{row['ctx_a']} {str(row.get('ctx_b', '')).capitalize()}"  # the harness capitalises ctx_b
    else:
        context = str(row.get("ctx", ""))
    label = row.get("activity_label")
    query = hellaswag_clean(f"{label}: {context}" if label else context)
    answer = row.get("label")
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
        answer = int(answer)
    return ChoiceItem(
        where, row, query, tuple(hellaswag_clean(e) for e in endings), _gold_index(where, answer, endings, [])
    )


def _plain_item(where: str, row: dict) -> ChoiceItem:
    choices = _check_choices(where, row.get("choices"))
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad(where, "empty prompt: give the row its prompt text")
    gold = _gold_index(where, row.get("answer"), choices, _letters(len(choices)) if len(choices) <= 26 else [])
    return ChoiceItem(where, row, prompt, tuple(choices), gold)


def _jsonl_layout(where: str, row: dict) -> str:
    if "endings" in row:
        return "hellaswag"
    if isinstance(row.get("choices"), dict):
        return "arc"
    if "prompt" in row:
        return "plain"
    if "question" in {str(k).lower() for k in row} and (isinstance(row.get("choices"), list) or _letter_columns(row)):
        return "mmlu"  # MMLU, C-Eval or CMMLU rows exported from the Hub as JSON lines
    if isinstance(row.get("choices"), list):
        return "plain"
    raise _bad(
        where,
        f"not a known choice layout (fields: {', '.join(row) or 'none'}): use ARC's question/choices/answerKey, "
        "HellaSwag's ctx/endings/label, or {prompt, choices, answer}",
    )


_JSONL_ITEMS = {"arc": _arc_item, "hellaswag": _hellaswag_item, "plain": _plain_item}


def load(path: Path, columns: str | None = None, cue: str | None = None) -> tuple[str, list[ChoiceItem], str]:
    """(layout, items, answer cue) of a choice file; bad rows raise a UserError naming the row.

    The cue ends MMLU-layout queries: "答案：" when the questions hold Chinese text (C-Eval, CMMLU), else
    "Answer:"; pass the evaluated file's cue when loading its few-shot file."""
    kind = records.file_kind(path)
    if kind in ("csv", "tsv"):
        rows, layout = _csv_rows(path, columns), "mmlu"
        if not rows:
            raise UserError(f"{path} has no rows: pass a file with questions")
    elif kind != "jsonl":
        raise UserError(f"{path}: choice files are .csv/.tsv (MMLU, C-Eval, CMMLU) or .jsonl, got {kind or 'none'!r}")
    elif columns:
        raise UserError("--columns names a CSV's columns: a JSONL file names its own fields, remove it")
    else:
        rows = records.read_jsonl(path, "choice data")
        layout = _jsonl_layout(*rows[0])
    if layout != "mmlu":
        return layout, [_JSONL_ITEMS[layout](where, row) for where, row in rows], cue or ANSWER_CUE
    if cue is None:
        questions = (str(v) for _, row in rows for k, v in row.items() if str(k).lower() == "question")
        cue = ANSWER_CUE_ZH if any(_CJK.search(q) for q in questions) else ANSWER_CUE
    named = _SUBJECT_FILE.match(storage.path(path).name)  # Hendrycks' MMLU files: anatomy_test.csv
    subject = named.group(1) if named and kind in ("csv", "tsv") else ""
    return layout, [_mmlu_item(where, row, cue, subject) for where, row in rows], cue


def shot_text(item: ChoiceItem) -> str:
    """A few-shot example: the query, the target delimiter, the gold choice, the few-shot delimiter."""
    return item.query + TARGET_DELIMITER + item.choices[item.gold] + FEWSHOT_DELIMITER


def contexts(items: list[ChoiceItem], pool: list[ChoiceItem], k: int, seed: int | None, same_file: bool) -> list[str]:
    """Each item's full context: k few-shot examples from `pool`, then its query.

    With a seed, the examples are drawn as lm-evaluation-harness's default sampler draws them: one
    random.Random(seed) for the whole file, used item after item; from the same file, k + 1 are drawn and the
    item itself (and any row equal to it) left out, keeping the first k. Without (seed None), they are the
    first k of the pool, less the item itself: the harness's first_n sampler (its MMLU, C-Eval, CMMLU tasks)."""
    if k == 0:
        return [item.description + item.query for item in items]
    need = k + 1 if same_file else k
    if len(pool) < need:
        where = "the file, leaving the item itself out" if same_file else "--fewshot-data"
        raise UserError(f"--num-fewshot {k} needs {need} examples in {where}, there are {len(pool)}: lower it")
    rng = Random(seed)
    out = []
    for item in items:
        rest = [s for s in pool if s.record != item.record] if same_file else pool
        if seed is None:
            shots = rest[:k]
        elif same_file:
            shots = [s for s in rng.sample(pool, k + 1) if s.record != item.record][:k]
            if len(shots) < k:  # duplicates of the item were drawn: draw again from the rest, as the harness does
                shots = rng.sample(rest, k) if len(rest) >= k else []
        else:
            shots = rng.sample(pool, k)
        if len(shots) < k:
            raise UserError(f"{item.where}: too few rows differ from this one for --num-fewshot {k}: lower it")
        out.append(item.description + "".join(shot_text(s) for s in shots) + item.query)
    return out
