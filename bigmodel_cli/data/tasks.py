"""Finetuning task formats: task files -> prompt/target examples -> token windows whose loss covers the target.

Every task is decoder-only text: a prompt, then the target the model learns to write, then EOS. A sequence is

    EOS  prompt  target  EOS  padding          (seq_len + 1 tokens, split into inputs/targets like pretraining)
    0    0...0   1...1   1    0...0            (loss weight of each token as a prediction target)

The leading EOS is the document boundary the model saw in pretraining (preprocess ends every document with
one), so a finetuning sequence starts the way every pretraining document did.

The prompt may hold one long, elastic part (QA context, document, source sentence, classified text, the last
user message of a chat). It is cut to fit `seq_len - 1 - max_target_tokens`, so that training and generation
see the same prompt and generation has room for `max_target_tokens` new tokens; QA contexts are windowed
instead, so that the answer stays inside the window trained on.

Prompts (all plain text, the same for every language):

    qa         "Context: {context}\nQuestion: {question}\nAnswer:"            -> " {answer}" / " unanswerable"
    classify   "Text: {text}\nLabel:"                                          -> " {label}"
    summarize  "Document: {document}\nSummary:"                                -> " {summary}"
    translate  "Translate {src} to {tgt}.\n{src}: {source}\n{tgt}:"            -> " {target}"
    instruct   render_chat(messages before the reply, add_generation_prompt=True) -> "{reply}<|end|>"
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

import numpy as np

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

    def label_map(self) -> dict[str, str]:
        """task.label_names as {label as in the file: word used in the target}."""
        mapping: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in self.label_names.split(","))):
            key, sep, name = (s.strip() for s in item.partition(":"))
            if not sep or not key or not name:
                raise UserError(f"task.label_names must look like '0:negative,1:positive', got {self.label_names!r}")
            mapping[key] = name
        return mapping


@dataclass(frozen=True)
class Example:
    task: str  # one of TASKS
    id: str  # the file's id (SQuAD `id`, JSONL `id`) or the record/line number
    prompt: str  # the whole prompt text, before encode/generation_prompts cut or window it to fit
    target: str  # what the model learns to write after the prompt (EOS follows)
    references: tuple[str, ...]  # gold texts to score against: qa every answer (() if unanswerable), else one
    meta: dict = field(default_factory=dict, compare=False)  # task details: qa context/question, instruct messages


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def _read_text(path: Path, what: str) -> str:
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
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}): fix the file") from None


def _read_jsonl(path: Path, what: str) -> list[tuple[str, dict]]:
    """(where, record) for every non-blank line; `where` is 'file:line' for error messages."""
    records = []
    for number, line in enumerate(_read_text(path, what).splitlines(), start=1):
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


def _records(path: Path, what: str) -> list[tuple[str, dict]]:
    """Rows of a JSONL, CSV or TSV file (header row; delimiter by extension) as (where, dict)."""
    kind = _kind(path)
    if kind == "jsonl":
        return _read_jsonl(path, what)
    if kind in ("csv", "tsv"):
        text = _read_text(path, what)
        # GLUE-style TSVs are unquoted and contain stray quote characters, so quoting is off for TSV only.
        quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if kind == "tsv" else ",", quoting=quoting)
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    raise UserError(f"{path}: {what} files must be .jsonl, .csv or .tsv (optionally .gz), got {kind or 'no suffix'!r}")


def _field(where: str, record: dict, name: str, option: str) -> str:
    """record[name] as stripped text, or a UserError naming the option that selects the field."""
    if name not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise UserError(f"{where}: no field {name!r} (fields: {fields}): set task.{option} to the right name")
    value = record[name]
    return "" if value is None else str(value).strip()


# ---------------------------------------------------------------------------------------------------------
# Parsing each task into Examples
# ---------------------------------------------------------------------------------------------------------


def _qa_prompt(context: str, question: str) -> str:
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


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
    bad_answers = dropped = unanswerable = questions = 0
    is_v2 = False
    for article in articles:
        paragraphs = article.get("paragraphs", [])
        if not isinstance(paragraphs, list) or not all(isinstance(p, dict) for p in paragraphs):
            raise UserError(f"{path} is not SQuAD-format JSON: expected {shape}")
        for paragraph in paragraphs:
            context = str(paragraph.get("context", ""))
            for qa in paragraph.get("qas", []):
                questions += 1
                qid = str(qa.get("id", questions))
                question = str(qa.get("question", "")).strip()
                if not question:
                    raise UserError(f"{path}: question {qid} has no 'question' text: fix the file")
                is_v2 = is_v2 or "is_impossible" in qa
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else [a for a in qa.get("answers", []) if isinstance(a, dict)]
                # Training needs the answer's place in the context, to keep it inside the window.
                good = [a for a in answers if _answer_found(context, a)]
                bad_answers += len(answers) - len(good)
                if not impossible and not good:
                    dropped += 1  # no answer whose position we trust (or none at all: not a training file)
                    continue
                unanswerable += impossible
                first = good[0] if good else None
                examples.append(
                    Example(
                        task="qa",
                        id=qid,
                        prompt=_qa_prompt(context, question),
                        target=f" {first['text'] if first else UNANSWERABLE}",
                        references=tuple(str(a.get("text", "")) for a in answers),
                        meta={
                            "context": context,
                            "question": question,
                            "answer_start": first["answer_start"] if first else None,
                            "answer": first["text"] if first else "",
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
        skipped_bad_answers=bad_answers,
        skipped_questions=dropped,
    )
    if bad_answers or dropped:
        _warn(
            f"{path}: skipped {bad_answers} answers whose answer_start does not match the context text; "
            f"{dropped} of {questions} questions were left without an answer and dropped"
        )
    return examples


def _label_order(label: str) -> tuple:
    """Sort integer labels numerically (2 before 10), others as text, integers first."""
    try:
        return (0, int(label), label)
    except ValueError:
        return (1, 0, label)


def _load_classify(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    names = opts.label_map()
    examples = []
    empty = 0
    for where, row in _records(path, "classification"):
        text = _field(where, row, opts.text_field, "text_field")
        label = _field(where, row, opts.label_field, "label_field")
        if not text or not label:
            empty += 1
            continue
        if names:
            if label not in names:
                raise UserError(f"{where}: label {label!r} is not in task.label_names: add it to the mapping")
            label = names[label]
        examples.append(_simple("classify", where.rpartition(":")[2], ("Text:", text, "\nLabel:"), label))
    info.update(labels=sorted({e.references[0] for e in examples}, key=_label_order), skipped_empty=empty)
    if empty:
        _warn(f"{path}: skipped {empty} rows with an empty text or label")
    return examples


def _load_summarize(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    examples = []
    empty = 0
    for where, record in _records(path, "summarization"):
        document = _field(where, record, opts.document_field, "document_field")
        summary = _field(where, record, opts.summary_field, "summary_field")
        if not document or not summary:
            empty += 1
            continue
        rid = str(record.get("id", where.rpartition(":")[2]))
        examples.append(_simple("summarize", rid, ("Document:", document, "\nSummary:"), summary))
    info.update(skipped_empty=empty)
    if empty:
        _warn(f"{path}: skipped {empty} records with an empty document or summary")
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
        sources = _read_text(path, f"{opts.source_lang} text").splitlines()
        targets = _read_text(path2, f"{opts.target_lang} text").splitlines()
        if len(sources) != len(targets):
            raise UserError(
                f"{path} has {len(sources)} lines but {path2} has {len(targets)}: the two translate files "
                "must be line-aligned (line i of one translates line i of the other)"
            )
        pairs = [(str(i), s.strip(), t.strip()) for i, (s, t) in enumerate(zip(sources, targets, strict=True), start=1)]
    elif _kind(path) == "jsonl":
        pairs = []
        for where, record in _read_jsonl(path, "translation"):
            source = _field(where, record, opts.source_field, "source_field")
            target = _field(where, record, opts.target_field, "target_field")
            pairs.append((str(record.get("id", where.rpartition(":")[2])), source, target))
    else:
        raise UserError(
            f"{path}: translate reads a JSONL file of {opts.source_field}/{opts.target_field} records, or two "
            "line-aligned text files: pass the target-language file as the second path"
        )
    head = f"Translate {opts.source_lang} to {opts.target_lang}.\n{opts.source_lang}:"
    tail = f"\n{opts.target_lang}:"
    examples = [_simple("translate", i, (head, s, tail), t) for i, s, t in pairs if s and t]
    info.update(skipped_empty=len(pairs) - len(examples))
    if len(pairs) > len(examples):
        _warn(f"{path}: skipped {len(pairs) - len(examples)} pairs with an empty source or target")
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
    prompt = str(record["instruction"]).strip()
    if str(record.get("input") or "").strip():
        prompt += "\n\n" + str(record["input"]).strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"]).strip()}]


def _load_instruct(path: Path, opts: TaskOptions, info: dict) -> list[Example]:
    if _kind(path) == "jsonl":
        records = _read_jsonl(path, "instruction")
    else:
        data = _read_json(path, "instruction JSON")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of Alpaca records {{instruction, input, output}}")
        records = [(f"{path} record {i}", r) for i, r in enumerate(data, start=1)]
    examples = []
    no_reply = 0
    for number, (where, record) in enumerate(records, start=1):
        messages = _chat_messages(where, record)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not replies or not messages[replies[-1]]["content"].strip():
            no_reply += 1
            continue
        messages = messages[: replies[-1] + 1]  # what follows the last reply is never trained on
        reply = messages[-1]["content"]
        examples.append(
            Example(
                task="instruct",
                id=str(record.get("id", number)),
                prompt=render_chat(messages[:-1], add_generation_prompt=True),
                target=reply + END_OF_TURN,
                references=(reply,),
                meta={"messages": messages},
            )
        )
    info.update(skipped_no_reply=no_reply)
    if no_reply:
        _warn(f"{path}: skipped {no_reply} records without a (non-empty) assistant message")
    return examples


def _warn(message: str) -> None:
    warnings.warn(message, TaskWarning, stacklevel=3)


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


# ---------------------------------------------------------------------------------------------------------
# Token layout: every example is text parts, each with a role in the sequence
# ---------------------------------------------------------------------------------------------------------

_PROMPT, _TRAINED, _CONTEXT, _ANSWER, _TARGET = "prompt", "trained", "context", "answer", "target"
# _PROMPT   prompt text, never trained on
# _TRAINED  trained on, inside the prompt (earlier assistant turns of a chat)
# _CONTEXT  the elastic part of the prompt: cut (or for qa windowed) to fit
# _ANSWER   qa: the gold answer's occurrence inside the context, kept inside the training window
# _TARGET   the final target: trained on, cut to max_target_tokens


def _parts(example: Example) -> list[tuple[str, str]]:
    """The example's full text (prompt + target) as (text, role) parts, in order."""
    meta = example.meta
    if example.task == "qa":
        context, start = meta["context"], meta["answer_start"]
        tail = f"\nQuestion: {meta['question']}\nAnswer:"
        if start is None:
            body = [(" " + context, _CONTEXT)]
        else:
            end = start + len(meta["answer"])
            body = [(" " + context[:start], _CONTEXT), (context[start:end], _ANSWER), (context[end:], _CONTEXT)]
        return [("Context:", _PROMPT), *body, (tail, _PROMPT), (example.target, _TARGET)]
    if example.task == "instruct":
        messages = meta["messages"]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        parts = []
        for i, m in enumerate(messages):
            parts.append((("\n" if i else "") + f"<|{m['role']}|>\n", _PROMPT))
            if m["role"] != "assistant":
                parts += [(m["content"], _CONTEXT if i == last_user else _PROMPT), (END_OF_TURN, _PROMPT)]
            else:
                parts.append((m["content"] + END_OF_TURN, _TARGET if i == len(messages) - 1 else _TRAINED))
        return parts
    head, text, tail = meta["prompt_parts"]
    return [(head, _PROMPT), (text, _CONTEXT), (tail, _PROMPT), (example.target, _TARGET)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:i] == b[:i] is monotone in i: binary search, comparing slices at C speed
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _tokenize_parts(tokenizer, texts: list[list[str]], chunk: int = 256) -> list[list[list[int]]]:
    """Token ids of every text part, cut so that the parts joined are exactly the tokenization of the text."""
    # Encoding each part alone would add a word-start marker to it and tokenize differently from the joined
    # text that generation encodes. So encode every prefix of the text and cut the full tokenization where
    # each prefix's tokenization departs from it; a token straddling a boundary goes to the later part.
    out = []
    for first in range(0, len(texts), chunk):
        prefixes = []
        for parts in texts[first : first + chunk]:
            joined = ""
            for text in parts:
                joined += text
                prefixes.append(joined)
        encoded = tokenizer.encode(prefixes)
        at = 0
        for parts in texts[first : first + chunk]:
            ids = encoded[at : at + len(parts)]
            at += len(parts)
            full, cuts, prev = ids[-1], [], 0
            for prefix in ids[:-1]:
                prev = max(prev, _common_prefix(prefix, full))
                cuts.append(prev)
            bounds = [0, *cuts, len(full)]
            out.append([full[bounds[k] : bounds[k + 1]] for k in range(len(parts))])
    return out


@dataclass
class _Layout:
    """One example's tokens: the prompt before the context, the context (cut or windowed), the prompt after
    it, and the target. Weights mark trained-on prompt tokens (earlier assistant turns of a chat)."""

    before: list[int] = field(default_factory=list)
    before_weights: list[float] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    answer: tuple[int, int] | None = None  # qa: the gold answer's token span inside `context`
    after: list[int] = field(default_factory=list)
    after_weights: list[float] = field(default_factory=list)
    target: list[int] = field(default_factory=list)


def _layouts(examples: Sequence[Example], tokenizer) -> list[_Layout]:
    all_parts = [_parts(e) for e in examples]
    tokens = _tokenize_parts(tokenizer, [[text for text, _ in parts] for parts in all_parts])
    layouts = []
    for parts, ids in zip(all_parts, tokens, strict=True):
        layout, seen_context = _Layout(), False
        for (_, role), part in zip(parts, ids, strict=True):
            if role in (_CONTEXT, _ANSWER):
                seen_context = True
                if role == _ANSWER:
                    # One token of margin on the right: a token straddling the answer's end went to the
                    # context after it, and must stay in the window too.
                    end = len(layout.context) + len(part) + 1
                    layout.answer = (len(layout.context), end)
                layout.context += part
            elif role == _TARGET:
                layout.target = part
            else:
                tokens_, weights = (
                    (layout.after, layout.after_weights) if seen_context else (layout.before, layout.before_weights)
                )
                tokens_ += part
                weights += [float(role == _TRAINED)] * len(part)
        if layout.answer:
            layout.answer = (layout.answer[0], min(layout.answer[1], len(layout.context)))
        layouts.append(layout)
    return layouts


def _eos(tokenizer) -> int:
    """The tokenizer's EOS id, which starts, ends and pads every sequence."""
    if tokenizer.eos_id < 0:
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'path', '')} has no EOS token, which finetuning needs to mark where "
            "a target ends: use a tokenizer with one (every tokenizer bigmodel trains has it)"
        )
    return tokenizer.eos_id


def _window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts of windows of `size` tokens every `stride` tokens over `length`, the last one ending at the end."""
    if length <= size or size <= 0:
        return [0]
    stride = min(stride, size)  # a stride wider than the window would skip context
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def _context_size(layout: _Layout, seq_len: int, opts: TaskOptions) -> int:
    """Context tokens that fit: seq_len minus the leading EOS, the rest of the prompt and the target budget;
    negative when even the rest of the prompt does not fit."""
    room = seq_len - 1 - opts.max_target_tokens - len(layout.before) - len(layout.after)
    return min(room, len(layout.context))


def _train_start(layout: _Layout, size: int, opts: TaskOptions) -> int | None:
    """Where the context window trained on starts; None when the answer does not fit in `size` tokens."""
    if layout.answer is None:
        return 0  # keep the beginning (qa without an answer: the first window)
    a0, a1 = layout.answer
    if a1 - a0 > size:
        return None
    starts = _window_starts(len(layout.context), size, opts.doc_stride)
    holding = [s for s in starts if s <= a0 and a1 <= s + size]
    if not holding:  # an answer longer than the windows' overlap can straddle them all: centre one on it
        holding = [min(max(a0 - (size - (a1 - a0)) // 2, 0), len(layout.context) - size)]
    # Of the evaluation windows (a grid) holding the answer, the one with the most context around it.
    return max(holding, key=lambda s: min(a0 - s, s + size - a1))


def encode(examples: Sequence[Example], tokenizer, seq_len: int, opts: TaskOptions) -> dict[str, np.ndarray]:
    """One [seq_len + 1] window per example -> inputs, targets, weights [N, seq_len] and example_index [N].

    Weights are 1 exactly where the predicted token belongs to the target or is the EOS after it (chats: every
    assistant turn), 0 on the prompt and on the right padding (EOS). Too-long contexts are cut at the end; QA
    trains on the context window that holds the answer with most room around it (unanswerable questions:
    the first window). Examples that cannot fit are left out, reported in one TaskWarning; `example_index`
    says which example each row holds. Pass only inputs/targets/weights to the train step.
    """
    if not examples:
        raise UserError("no examples to encode: check the task data file")
    if seq_len - 1 - opts.max_target_tokens < 1:
        raise UserError(
            f"data.seq_len ({seq_len}) leaves no room for a prompt next to task.max_target_tokens "
            f"({opts.max_target_tokens}): raise data.seq_len or lower task.max_target_tokens"
        )
    eos = _eos(tokenizer)
    windows = np.full((len(examples), seq_len + 1), eos, np.int32)  # padding: EOS, never trained on
    mask = np.zeros((len(examples), seq_len + 1), np.float32)  # 1 where the token is trained on
    index = []
    left_out = cut = 0
    for i, layout in enumerate(_layouts(examples, tokenizer)):
        size = _context_size(layout, seq_len, opts)
        start = _train_start(layout, size, opts) if size >= 0 and (size or not layout.context) else None
        if start is None:
            left_out += 1
            continue
        target = layout.target[: opts.max_target_tokens]
        finished = len(target) == len(layout.target)  # a cut target must not teach the model to stop there
        cut += not finished
        context = layout.context[start : start + size]
        tokens = [eos, *layout.before, *context, *layout.after, *target, *[eos] * finished]
        weights = [0.0, *layout.before_weights, *[0.0] * size, *layout.after_weights, *[1.0] * len(target)]
        weights += [1.0] * finished
        row = len(index)
        windows[row, : len(tokens)] = tokens
        mask[row, : len(weights)] = weights
        index.append(i)
    notes = []
    if left_out:
        notes.append(
            f"{left_out} of {len(examples)} examples left out: their prompt (qa: or answer) does not fit "
            f"data.seq_len={seq_len}"
        )
    if cut:
        notes.append(f"{cut} targets cut to task.max_target_tokens={opts.max_target_tokens}")
    if notes:
        _warn("; ".join(notes))
    if not index:
        raise UserError(
            f"no example fits data.seq_len={seq_len} with task.max_target_tokens={opts.max_target_tokens}: "
            "raise data.seq_len"
        )
    rows = len(index)
    # Position t predicts token t + 1, so the loss weight of position t is the mask of token t + 1.
    return {
        "inputs": windows[:rows, :-1],
        "targets": windows[:rows, 1:],
        "weights": mask[:rows, 1:],
        "example_index": np.asarray(index, np.int64),
    }


def generation_prompts(
    examples: Sequence[Example], tokenizer, seq_len: int, opts: TaskOptions
) -> list[list[list[int]]]:
    """Token ids to generate from, per example: [prompt], or for a too-long qa context one per window.

    A prompt is the training sequence up to the target (same tokens, same cut, leading EOS included), at
    most seq_len - max_target_tokens long so that max_target_tokens new tokens fit. For several qa windows,
    generate from each and keep the answer with the highest mean token log-probability among those that are
    not UNANSWERABLE (all unanswerable -> ""). Stop generating at EOS (chats: also at END_OF_TURN). A prompt
    too long even without its context keeps its last tokens, so every example gets an answer.
    """
    eos, limit = _eos(tokenizer), seq_len - opts.max_target_tokens - 1
    if limit < 1:
        raise UserError(
            f"data.seq_len ({seq_len}) leaves no room for a prompt next to task.max_target_tokens "
            f"({opts.max_target_tokens}): raise data.seq_len or lower task.max_target_tokens"
        )
    out = []
    for example, layout in zip(examples, _layouts(examples, tokenizer), strict=True):
        size = max(_context_size(layout, seq_len, opts), 0)
        windowed = example.task == "qa"
        starts = _window_starts(len(layout.context), size, opts.doc_stride) if windowed else [0]
        prompts = []
        for start in starts:
            tokens = [*layout.before, *layout.context[start : start + size], *layout.after]
            prompts.append([eos, *tokens[-limit:]])
        out.append(prompts)
    return out


def extract_answer(task: str, generated: str) -> str:
    """The answer in a generated continuation, as the metrics expect it (qa: UNANSWERABLE -> "")."""
    text = generated.split(END_OF_TURN)[0]
    if task in ("qa", "classify"):
        text = text.strip().split("\n")[0]
    text = text.strip()
    if task == "qa" and text.lower().rstrip(".") == UNANSWERABLE:
        return ""
    return text


# ---------------------------------------------------------------------------------------------------------
# Checking and showing loss masks
# ---------------------------------------------------------------------------------------------------------


def check_masks(encoded: dict[str, np.ndarray]) -> None:
    """Raise a UserError when a finetuning batch (or set) trains on no token, or on every token."""
    weights = np.asarray(encoded["weights"])
    if weights.size == 0 or not weights.any():
        raise UserError(
            "the loss mask is all zeros, nothing would be trained: no target fits; raise data.seq_len or "
            "lower task.max_target_tokens"
        )
    if (weights > 0).all():
        raise UserError(
            "the loss mask is all ones, the prompt would be trained on too: the prompts are empty; check the "
            "task file and the [task] field names"
        )


def _decoded_runs(tokens: list[int], flags: list[bool], tokenizer) -> list[tuple[str, bool]]:
    """Text of each run of tokens with the same flag; EOS written ⟨eos⟩."""
    runs: list[tuple[list[int], bool]] = []
    for token, flag in zip(tokens, flags, strict=True):
        if runs and runs[-1][1] == flag and (token == tokenizer.eos_id) == (runs[-1][0][-1] == tokenizer.eos_id):
            runs[-1][0].append(token)
        else:
            runs.append(([token], flag))
    out, plain, shown = [], [], ""
    for ids, flag in runs:
        if ids[0] == tokenizer.eos_id:
            out.append(("⟨eos⟩" * len(ids), flag))
            continue
        # Decode the growing text and take the new part, so that word-start spaces survive between runs.
        plain += ids
        text = tokenizer.decode(plain)
        same = len(shown)
        while not text.startswith(shown[:same]):
            same -= 1
        out.append((text[same:], flag))
        shown = text
    merged: list[tuple[str, bool]] = []
    for text, flag in out:  # EOS split the runs only for decoding: show one run per flag
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    return merged


def show_examples(encoded: dict[str, np.ndarray], tokenizer, n: int = 3) -> str:
    """The first n encoded rows as text, trained-on tokens inside ⟦...⟧ and EOS written ⟨eos⟩."""
    blocks = []
    for row in range(min(n, len(encoded["inputs"]))):
        tokens = [int(encoded["inputs"][row, 0]), *map(int, encoded["targets"][row])]
        trained = [False, *(float(w) > 0 for w in encoded["weights"][row])]
        end = len(tokens)
        while end > 1 and tokens[end - 1] == tokenizer.eos_id and not trained[end - 1]:
            end -= 1  # right padding
        body = "".join(
            f"⟦{text}⟧" if flag else text for text, flag in _decoded_runs(tokens[:end], trained[:end], tokenizer)
        )
        example = int(encoded["example_index"][row]) if "example_index" in encoded else row
        blocks.append(
            f"--- example {example}: {end} tokens, {sum(trained)} trained on (in ⟦...⟧), "
            f"{len(tokens) - end} padding\n{body}"
        )
    return "\n".join(blocks)
