"""Finetuning task files -> Examples: read SQuAD JSON, JSONL, CSV/TSV or line-aligned text and parse each task.

Records with an empty required field are skipped and reported in one TaskWarning line per file (count and
first ids); a missing field or an unreadable file is a one-line UserError naming the fix. How an Example
becomes tokens is data/tasks.py's business.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel_cli.errors import UserError

TASKS = ("qa", "classify", "summarize", "translate", "instruct")
UNANSWERABLE = "unanswerable"  # qa target for SQuAD v2 questions without an answer; extract_answer maps it to ""
END_OF_TURN = "<|end|>"  # ends every chat message; generation of a reply can stop when it appears
ROLES = ("system", "user", "assistant")

# The chat format as a Jinja template (Hugging Face's `chat_template`), stored with the model; render_chat is
# the same format in Python. Messages are "<|role|>\n{content}<|end|>", joined by newlines; the generation
# prompt opens an assistant message. Plain text, so any tokenizer can encode it without special tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}\n{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}\n{% endif %}<|assistant|>\n{% endif %}"
)


class TaskWarning(UserWarning):
    """Data that was skipped or cut, reported as one line per file (never fatal)."""


@dataclass(frozen=True)
class TaskOptions:
    text_field: str = "text"  # classify: column (CSV/TSV header) or JSONL field holding the text
    label_field: str = "label"  # classify: column or JSONL field holding the label
    label_names: str = ""  # classify: label words for the target, e.g. "0:negative,1:positive"; "" = as given
    columns: str = ""  # CSV/TSV without a header row: its column names, e.g. "label,title,text"; "" = row 1 names them
    document_field: str = "document"  # summarize: JSONL field holding the document
    summary_field: str = "summary"  # summarize: JSONL field holding the reference summary
    source_field: str = "source"  # translate: JSONL field holding the sentence to translate
    target_field: str = "target"  # translate: JSONL field holding the reference translation
    source_lang: str = "English"  # translate: name of the source language, written in the prompt
    target_lang: str = "German"  # translate: name of the target language, written in the prompt
    max_target_tokens: int = 64  # target tokens kept for training and new tokens allowed at generation
    doc_stride: int = 64  # qa: tokens between the starts of successive windows over a too-long context

    def __post_init__(self) -> None:
        for name in ("max_target_tokens", "doc_stride"):
            if getattr(self, name) <= 0:
                raise UserError(f"task.{name} must be positive, got {getattr(self, name)}")
        self.label_map()  # validates the syntax early, at recipe load
        self.column_names()

    def label_map(self) -> dict[str, str]:
        """task.label_names as {label as in the file: word used in the target}."""
        mapping: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in self.label_names.split(","))):
            key, sep, name = (s.strip() for s in item.partition(":"))
            if not sep or not key or not name:
                raise UserError(f"task.label_names must look like '0:negative,1:positive', got {self.label_names!r}")
            mapping[key] = name
        return mapping

    def column_names(self) -> list[str]:
        """task.columns as a list; [] when the file's first row names the columns."""
        names = [s.strip() for s in self.columns.split(",")] if self.columns.strip() else []
        if not all(names) or len(set(names)) != len(names):
            raise UserError(f"task.columns must be distinct names like 'label,title,text', got {self.columns!r}")
        return names


@dataclass(frozen=True)
class Example:
    task: str  # one of TASKS
    id: str  # the file's id (SQuAD `id`, JSONL `id`) or the record/line number
    prompt: str  # the whole prompt text, before encode/generation_prompts cut or window it to fit
    target: str  # what the model learns to write after the prompt (EOS follows)
    references: tuple[str, ...]  # gold texts to score against: qa every answer (() if unanswerable), else one
    # Task details: qa context/question/answer_start (None: no answer position to train on), instruct messages.
    meta: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def read_text(path: Path, what: str) -> str:
    """A whole text file (gzip when it ends in .gz), or a UserError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: pass an existing {what} file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not readable UTF-8 text ({err}): pass a UTF-8 {what} file") from None
    if not text.strip():
        raise UserError(f"{path} is empty: pass a {what} file with data")
    return text


def _kind(path: Path) -> str:
    """The format suffix, ignoring a trailing .gz: 'json', 'jsonl', 'csv', 'tsv', ..."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    return suffixes[-1].lstrip(".") if suffixes else ""


def _read_json(path: Path, what: str) -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}): fix the file") from None


def _read_jsonl(path: Path, what: str) -> list[tuple[str, dict]]:
    """(where, record) for every non-blank line; `where` is 'file:line' for error messages."""
    records = []
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg}): fix or remove the line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append((f"{path}:{number}", record))
    return records


def _records(path: Path, what: str, opts: TaskOptions, needed: Sequence[tuple[str, str]]) -> list[tuple[str, dict]]:
    """Rows of a JSONL, CSV or TSV file as (where, dict); CSV/TSV columns are named by the first row or by
    task.columns. `needed` holds (field, option) pairs that the columns must include."""
    kind = _kind(path)
    if kind == "jsonl":
        return _read_jsonl(path, what)  # records name their fields: task.columns does not apply
    if kind not in ("csv", "tsv"):
        raise UserError(
            f"{path}: {what} files must be .jsonl, .csv or .tsv (optionally .gz), got {kind or 'no suffix'!r}"
        )
    # GLUE-style TSVs are unquoted and contain stray quote characters, so quoting is off for TSV only.
    quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(read_text(path, what)), delimiter="\t" if kind == "tsv" else ",", quoting=quoting)
    rows = [(reader.line_num, [cell.strip() for cell in cells]) for cells in reader if cells]
    names = opts.column_names()
    if names:
        if rows and rows[0][1] == names:
            rows = rows[1:]  # the file has the header after all: it is not data
        for name, option in needed:
            if name not in names:
                raise UserError(
                    f"{path}: task.columns ({opts.columns}) has no {name!r}: name that column {name} there, "
                    f"or set task.{option} to one of its names"
                )
    elif rows:
        names, rows = rows[0][1], rows[1:]
        missing = [(name, option) for name, option in needed if name not in names]
        if missing and any(_looks_like_data(cell) for cell in names):
            guess = _guess_columns([names] + [cells for _, cells in rows[:20]], needed)
            raise UserError(
                f"{path} seems to have no header row (its first row {_short(names)} looks like data): name its "
                f"columns with --columns {guess} (or --set task.columns={guess})"
            )
        if missing:
            raise _no_field(f"{path}:1", names, *missing[0])
    # Missing cells read as "" (the row is then skipped as empty); cells beyond the named columns are ignored.
    return [(f"{path}:{line}", dict(zip(names, [*cells, *[""] * len(names)], strict=False))) for line, cells in rows]


def _looks_like_data(cell: str) -> bool:
    """A header cell no header would hold: a number, or a phrase of several words."""
    try:
        float(cell)
        return True
    except ValueError:
        return len(cell.split()) > 3


def _guess_columns(rows: list[list[str]], needed: Sequence[tuple[str, str]]) -> str:
    """Column names for headerless rows: the label on the shortest column, other fields on the longest ones."""
    width = len(rows[0])
    length = [sum(len(row[i]) for row in rows if i < len(row)) for i in range(width)]  # total, over the rows
    names = [f"col{i}" for i in range(1, width + 1)]
    free = list(range(width))
    for name, option in sorted(needed, key=lambda n: n[1] != "label_field"):
        if not free:
            break
        at = (min if option == "label_field" else max)(free, key=lambda i: length[i])
        names[at] = name
        free.remove(at)
    return ",".join(names)


def _short(cells: list[str]) -> str:
    """A row for a one-line message: its cells, each cut to 30 characters."""
    return "[" + ", ".join(repr(c if len(c) <= 30 else c[:27] + "...") for c in cells) + "]"


def _no_field(where: str, fields: Sequence, name: str, option: str) -> UserError:
    shown = ", ".join(map(str, fields)) or "none"
    return UserError(f"{where}: no field {name!r} (fields: {shown}): set task.{option} to the right name")


def _field(where: str, record: dict, name: str, option: str) -> str:
    """record[name] as stripped text, or a UserError naming the option that selects the field."""
    if name not in record:
        raise _no_field(where, list(record), name, option)
    return _text(record[name])


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


class _Skipped:
    """Records left out for an empty required field: counted, and reported as one warning line per file."""

    def __init__(self, path: Path, things: str, ids: str = "ids"):
        self.path, self.things, self.label = path, things, ids
        self.ids: list[str] = []
        self.reasons: list[str] = []  # e.g. "an empty question", in order of first appearance

    def add(self, id_: str, reason: str) -> None:
        self.ids.append(id_)
        if reason not in self.reasons:
            self.reasons.append(reason)

    def report(self, info: dict) -> None:
        """Store the count in the task info and warn once (naming the file and the first ids) if any."""
        info["skipped_empty"] = len(self.ids)
        if self.ids:
            shown = ", ".join(self.ids[:3]) + (", ..." if len(self.ids) > 3 else "")
            _warn(
                f"{self.path}: skipped {len(self.ids)} {self.things} with {' or '.join(self.reasons)} "
                f"({self.label}: {shown})"
            )


def _warn(message: str) -> None:
    warnings.warn(message, TaskWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------
# Parsing each task into Examples
# ---------------------------------------------------------------------------------------------------------


def _answer_found(context: str, answer: dict) -> bool:
    """True when the answer's text really stands at its answer_start in the context."""
    start, text = answer.get("answer_start"), answer.get("text")
    if not isinstance(start, int) or not isinstance(text, str) or not text.strip() or start < 0:
        return False
    return context[start : start + len(text)] == text


def _load_qa(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    data = _read_json(path, "SQuAD-format JSON")
    articles = data.get("data") if isinstance(data, dict) else data
    shape = '{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}'
    if not isinstance(articles, list) or not all(isinstance(a, dict) for a in articles):
        raise UserError(f"{path} is not SQuAD-format JSON: expected {shape}")
    examples: list[Example] = []
    skipped = _Skipped(path, "questions")
    bad_starts = no_position = unanswerable = questions = 0
    is_v2 = False
    for article in articles:
        paragraphs = article.get("paragraphs", [])
        if not isinstance(paragraphs, list) or not all(isinstance(p, dict) for p in paragraphs):
            raise UserError(f"{path} is not SQuAD-format JSON: expected {shape}")
        for paragraph in paragraphs:
            context = "" if paragraph.get("context") is None else str(paragraph["context"])  # offsets: no strip
            for qa in paragraph.get("qas", []):
                questions += 1
                qid = str(qa.get("id", questions))
                question = _text(qa.get("question"))
                if not question or not context.strip():
                    skipped.add(qid, "an empty question" if not question else "an empty context")
                    continue
                is_v2 = is_v2 or "is_impossible" in qa
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else [a for a in qa.get("answers", []) if isinstance(a, dict)]
                # Training needs an answer's place in the context, to keep it inside the window; scoring needs
                # only the texts. So every question is kept, and one without a trusted place has answer_start
                # None: encode leaves it out of training.
                good = [a for a in answers if _answer_found(context, a)]
                bad_starts += len(answers) - len(good)
                no_position += not impossible and not good
                unanswerable += impossible
                first = (good or answers or [None])[0]
                answer = _text(first.get("text")) if first else ""
                examples.append(
                    Example(
                        task="qa",
                        id=qid,
                        prompt=f"Context: {context}\nQuestion: {question}\nAnswer:",
                        target=f" {UNANSWERABLE if impossible else answer}",
                        references=tuple(str(a.get("text", "")) for a in answers),
                        meta={
                            "context": context,
                            "question": question,
                            "answer_start": good[0]["answer_start"] if good else None,
                            "answer": good[0]["text"] if good else "",
                            "is_impossible": impossible,
                        },
                    )
                )
    if not questions:
        raise UserError(f"{path} has no questions: a SQuAD-format file lists them as {shape}")
    info.update(
        squad_version="2.0" if is_v2 else "1.1",
        questions=questions,
        unanswerable=unanswerable,
        bad_answer_starts=bad_starts,  # answers whose answer_start does not point at their text
        no_answer_position=no_position,  # answerable questions that training leaves out (still scored)
    )
    skipped.report(info)
    return examples


def _label_order(label: str) -> tuple:
    """Sort key for labels: integers numerically (2 before 10) and first, others as text."""
    try:
        return (0, int(label), label)
    except ValueError:
        return (1, 0, label)


def _load_classify(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    names = opts.label_map()
    needed = [(opts.text_field, "text_field"), (opts.label_field, "label_field")]
    examples = []
    skipped = _Skipped(path, "rows", ids="lines")
    for where, row in _records(path, "classification", opts, needed):
        text = _field(where, row, opts.text_field, "text_field")
        label = _field(where, row, opts.label_field, "label_field")
        line = where.rpartition(":")[2]
        if not text or not label:
            skipped.add(line, f"an empty {opts.text_field if not text else opts.label_field}")
            continue
        if names:
            if label not in names:
                raise UserError(f"{where}: label {label!r} is not in task.label_names: add it to the mapping")
            label = names[label]
        examples.append(_simple("classify", line, ("Text:", text, "\nLabel:"), label))
    # The label set comes from the data (or task.label_names' words); the run stores it for evaluation.
    info.update(labels=sorted({e.references[0] for e in examples}, key=_label_order))
    skipped.report(info)
    return examples


def _load_summarize(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    needed = [(opts.document_field, "document_field"), (opts.summary_field, "summary_field")]
    examples = []
    skipped = _Skipped(path, "records")
    for where, record in _records(path, "summarization", opts, needed):
        document = _field(where, record, opts.document_field, "document_field")
        summary = _field(where, record, opts.summary_field, "summary_field")
        rid = _text(record.get("id")) or where.rpartition(":")[2]
        if not document or not summary:
            skipped.add(rid, f"an empty {opts.document_field if not document else opts.summary_field}")
            continue
        examples.append(_simple("summarize", rid, ("Document:", document, "\nSummary:"), summary))
    skipped.report(info)
    return examples


def _simple(task: str, id_: str, prompt: tuple[str, str, str], target: str) -> Example:
    """An example whose prompt is head + " " + input + tail and whose target is " " + target."""
    head, text, tail = prompt
    # The prompt's parts stay in meta: the input is the part that encode cuts when it is too long.
    parts = (head, " " + text, tail)
    return Example(
        task=task,
        id=id_,
        prompt="".join(parts),
        target=" " + target,
        references=(target,),
        meta={"prompt_parts": parts},
    )


def _load_translate(path: Path, opts: TaskOptions, info: dict, path2: Path | None) -> list[Example]:
    if path2 is not None:
        sources = read_text(path, f"{opts.source_lang} text").splitlines()
        targets = read_text(path2, f"{opts.target_lang} text").splitlines()
        if len(sources) != len(targets):
            raise UserError(
                f"{path} has {len(sources)} lines but {path2} has {len(targets)}: the two translate files "
                "must be line-aligned (line i of one translates line i of the other)"
            )
        pairs = [(str(i), s.strip(), t.strip()) for i, (s, t) in enumerate(zip(sources, targets, strict=True), start=1)]
        skipped = _Skipped(path, "pairs", ids="lines")
        names = (f"{opts.source_lang} line", f"{opts.target_lang} line")
    elif _kind(path) == "jsonl":
        pairs = []
        for where, record in _read_jsonl(path, "translation"):
            source = _field(where, record, opts.source_field, "source_field")
            target = _field(where, record, opts.target_field, "target_field")
            pairs.append((_text(record.get("id")) or where.rpartition(":")[2], source, target))
        skipped = _Skipped(path, "pairs")
        names = (opts.source_field, opts.target_field)
    else:
        raise UserError(
            f"{path}: translate reads a JSONL file of {opts.source_field}/{opts.target_field} records, or two "
            "line-aligned text files: pass the target-language file as the second path"
        )
    head = f"Translate {opts.source_lang} to {opts.target_lang}.\n{opts.source_lang}:"
    tail = f"\n{opts.target_lang}:"
    examples = []
    for id_, source, target in pairs:
        if not source or not target:
            skipped.add(id_, f"an empty {names[0] if not source else names[1]}")
            continue
        examples.append(_simple("translate", id_, (head, source, tail), target))
    skipped.report(info)
    return examples


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Messages [{"role", "content"}] as CHAT_TEMPLATE text; optionally opening the assistant's reply."""
    text = "\n".join(f"<|{m['role']}|>\n{m['content']}{END_OF_TURN}" for m in messages)
    if add_generation_prompt:
        text += ("\n" if messages else "") + "<|assistant|>\n"
    return text


def _chat_messages(where: str, record: dict) -> list[dict]:
    """A chat record's messages, checked; or an Alpaca record turned into a user/assistant exchange."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        out = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(
                    f"{where}: each message needs a role ({', '.join(ROLES)}) and a text content, got {m!r}"[:300]
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out
    for name in ("instruction", "output"):
        if name not in record:
            raise UserError(
                f"{where}: no field {name!r}: instruct records are Alpaca {{instruction, input, output}} "
                "or chat {messages: [{role, content}]}"
            )
    prompt = _text(record["instruction"])
    if _text(record.get("input")):
        prompt += "\n\n" + _text(record["input"])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"])}]


def _load_instruct(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    if _kind(path) == "jsonl":
        records = _read_jsonl(path, "instruction")
    else:
        data = _read_json(path, "instruction JSON")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of Alpaca records {{instruction, input, output}}")
        records = [(f"{path} record {i}", r) for i, r in enumerate(data, start=1)]
    examples = []
    skipped = _Skipped(path, "records")
    for number, (where, record) in enumerate(records, start=1):
        rid = _text(record.get("id")) or str(number)
        messages = _chat_messages(where, record)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        alpaca = "messages" not in record
        if alpaca and not _text(record["instruction"]):
            skipped.add(rid, "an empty instruction")
            continue
        if not replies or not messages[replies[-1]]["content"].strip():
            skipped.add(rid, "an empty output" if alpaca else "no (non-empty) assistant reply")
            continue
        messages = messages[: replies[-1] + 1]  # what follows the last reply is never trained on
        reply = messages[-1]["content"]
        examples.append(
            Example(
                task="instruct",
                id=rid,
                prompt=render_chat(messages[:-1], add_generation_prompt=True),
                target=reply + END_OF_TURN,
                references=(reply,),
                meta={"messages": messages},
            )
        )
    skipped.report(info)
    return examples


def load_examples(task: str, path: Path, opts: TaskOptions, *, path2: Path | None = None) -> tuple[list[Example], dict]:
    """Parse a task file (translate: or two line-aligned files) into Examples, plus task info for the run."""
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}; got {task!r}")
    if path2 is not None and task != "translate":
        raise UserError(f"a second data file is only for --task translate (line-aligned target file), not {task}")
    path = Path(path)
    info: dict[str, Any] = {"task": task, "path": str(path)}
    if task == "qa":
        examples = _load_qa(path, opts, info)
    elif task == "classify":
        examples = _load_classify(path, opts, info)
    elif task == "summarize":
        examples = _load_summarize(path, opts, info)
    elif task == "translate":
        examples = _load_translate(path, opts, info, None if path2 is None else Path(path2))
    else:
        examples = _load_instruct(path, opts, info)
    if not examples:
        raise UserError(f"{path} holds no usable {task} examples: check the file and the [task] field names")
    info["examples"] = len(examples)
    return examples, info


def check_labels(examples: Sequence[Example], labels: Sequence[str]) -> None:
    """Raise a UserError naming any classify label of `examples` that is not among the trained `labels`."""
    known = set(labels)
    unseen = sorted({e.references[0] for e in examples} - known, key=_label_order)
    if unseen:
        shown = ", ".join(repr(x) for x in unseen[:3]) + (", ..." if len(unseen) > 3 else "")
        raise UserError(
            f"label {shown} was never seen in training (trained labels: {', '.join(labels)}): evaluate on "
            "data with the same labels, or map them onto these with task.label_names"
        )
