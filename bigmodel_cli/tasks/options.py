"""What every task kind shares: the [task] options of a recipe, the Example a task file becomes, and the
warning for data that is skipped or cut."""

from __future__ import annotations

from dataclasses import dataclass, field

from bigmodel_cli.errors import UserError


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
    task: str  # the name of its task kind (bigmodel_cli.tasks.NAMES)
    id: str  # the file's id (SQuAD `id`, JSONL `id`) or the record/line number
    prompt: str  # the whole prompt text, before the layout cuts or windows it to fit
    target: str  # what the model learns to write after the prompt (EOS follows)
    references: tuple[str, ...]  # gold texts to score against: qa every answer (() if unanswerable), else one
    # Task details: qa context/question/answer_start (None: no answer position to train on), instruct messages,
    # the prompt's parts of the other kinds.
    meta: dict = field(default_factory=dict, compare=False)
