"""Finetuning task files -> Examples: parse SQuAD JSON, JSONL, CSV/TSV or line-aligned text for each task.

Records with an empty required field are skipped and reported in one warning line per file (count and first
ids); a missing field or an unreadable file is a one-line UserError naming the fix. data/task_records.py reads
the files; how an Example becomes tokens is data/tasks.py's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel_cli.data import task_records as R
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
# Parsing each task into Examples
# ---------------------------------------------------------------------------------------------------------


def _answer_found(context: str, answer: dict) -> bool:
    """True when the answer's text really stands at its answer_start in the context."""
    start, text = answer.get("answer_start"), answer.get("text")
    if not isinstance(start, int) or not isinstance(text, str) or not text.strip() or start < 0:
        return False
    return context[start : start + len(text)] == text


def _load_qa(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    data = R.read_json(path, "SQuAD-format JSON")
    articles = data.get("data") if isinstance(data, dict) else data
    shape = '{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}'
    if not isinstance(articles, list) or not all(isinstance(a, dict) for a in articles):
        raise UserError(f"{path} is not SQuAD-format JSON: expected {shape}")
    examples: list[Example] = []
    skipped = R.Skipped(path, "questions")
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
                question = R.text(qa.get("question"))
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
                answer = R.text(first.get("text")) if first else ""
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
    skipped = R.Skipped(path, "rows", ids="lines")
    for where, row in R.records(path, "classification", opts.column_names(), needed):
        text = R.field(where, row, opts.text_field, "text_field")
        label = R.field(where, row, opts.label_field, "label_field")
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
    skipped = R.Skipped(path, "records")
    for where, record in R.records(path, "summarization", opts.column_names(), needed):
        document = R.field(where, record, opts.document_field, "document_field")
        summary = R.field(where, record, opts.summary_field, "summary_field")
        rid = R.text(record.get("id")) or where.rpartition(":")[2]
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
        sources = R.read_text(path, f"{opts.source_lang} text").splitlines()
        targets = R.read_text(path2, f"{opts.target_lang} text").splitlines()
        if len(sources) != len(targets):
            raise UserError(
                f"{path} has {len(sources)} lines but {path2} has {len(targets)}: the two translate files "
                "must be line-aligned (line i of one translates line i of the other)"
            )
        pairs = [(str(i), s.strip(), t.strip()) for i, (s, t) in enumerate(zip(sources, targets, strict=True), start=1)]
        skipped = R.Skipped(path, "pairs", ids="lines")
        names = (f"{opts.source_lang} line", f"{opts.target_lang} line")
    elif R.file_kind(path) == "jsonl":
        pairs = []
        for where, record in R.read_jsonl(path, "translation"):
            source = R.field(where, record, opts.source_field, "source_field")
            target = R.field(where, record, opts.target_field, "target_field")
            pairs.append((R.text(record.get("id")) or where.rpartition(":")[2], source, target))
        skipped = R.Skipped(path, "pairs")
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
    prompt = R.text(record["instruction"])
    if R.text(record.get("input")):
        prompt += "\n\n" + R.text(record["input"])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": R.text(record["output"])}]


def _load_instruct(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    if R.file_kind(path) == "jsonl":
        records = R.read_jsonl(path, "instruction")
    else:
        data = R.read_json(path, "instruction JSON")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of Alpaca records {{instruction, input, output}}")
        records = [(f"{path} record {i}", r) for i, r in enumerate(data, start=1)]
    examples = []
    skipped = R.Skipped(path, "records")
    for number, (where, record) in enumerate(records, start=1):
        rid = R.text(record.get("id")) or str(number)
        messages = _chat_messages(where, record)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        alpaca = "messages" not in record
        if alpaca and not R.text(record["instruction"]):
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
    if opts.columns and R.file_kind(path) not in ("csv", "tsv"):
        raise UserError(
            f"--columns (task.columns) names the columns of a CSV/TSV file without a header row; {path} is not "
            "one: remove it"
        )
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
