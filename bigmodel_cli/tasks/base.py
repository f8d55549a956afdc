"""What a task kind is: one object that reads its files into Examples, lays them out as text parts, reads the
answer out of generated text, predicts (generating, or choosing among labels) and scores predictions.

Each kind (qa.py, classify.py, ...) is a subclass that fills in what differs; the registry in __init__.py lists
them. Running the model stays with evaluation, which hands a kind a Predictor to call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import layout
from bigmodel_cli.tasks.chat import END_OF_TURN
from bigmodel_cli.tasks.layout import CONTEXT, PROMPT, TARGET
from bigmodel_cli.tasks.options import Example, TaskOptions
from bigmodel_cli.tasks.records import file_kind, lines, read_text


class Predictor(Protocol):
    """The model-running side of evaluation (evaluate/task_eval.py), handed to Task.predict."""

    def generate(self, kind: Task, examples: Sequence[Example]) -> dict[str, str]:
        """{example id: answer} generated greedily from kind.generation_prompts, read by kind.extract_answer."""
        ...

    def choose(self, examples: Sequence[Example], continuations: Sequence[str]) -> dict[str, int]:
        """{example id: index of the continuation (of its prompt) that the model finds most likely}."""
        ...


@dataclass(frozen=True)
class EvalSettings:
    """What choosing the examples to score, and scoring them, needs besides the predictions."""

    data: Path  # the task file evaluated (qa scores against its questions as the official scripts read them)
    opts: TaskOptions  # the task options the examples were read with
    labels: tuple[str, ...] = ()  # classify: the label set
    metric: str = "auto"  # qa: squad, cmrc2018 or auto (by the data's language)
    max_examples: int = 0  # score only the first N examples (qa: the first N questions of the file); 0 = all


class Task:
    """One kind of finetuning task. Subclasses set `name` and implement `read` and `score`."""

    name = ""  # what --task and task.json call it
    windowed = False  # a too-long context is read in overlapping windows (qa) instead of being cut
    paired_files = False  # a second, line-aligned file may hold the targets (translate)
    metric_choices: tuple[str, ...] = ()  # the metrics --metric chooses among (qa); () = fixed metrics
    pairs = False  # examples are preference pairs (a chosen and a rejected completion), not one target
    keyed_by_id = True  # predictions are matched to examples by id (instruct: scored by loss, keyed by nothing)
    units = "examples"  # what an error calls the file's items (qa: its questions)

    # ---- files -> Examples ------------------------------------------------------------------------------

    def load(self, path: Path, opts: TaskOptions, *, path2: Path | None = None) -> tuple[list[Example], dict]:
        """Parse a task file (translate: or two line-aligned files) into Examples, plus task info for the run."""
        if path2 is not None and not self.paired_files:
            raise UserError(
                f"a second data file is only for --task translate (line-aligned target file), not {self.name}"
            )
        path = storage.path(path)
        if opts.columns and file_kind(path) not in ("csv", "tsv"):
            raise UserError(
                f"--columns (task.columns) names the columns of a CSV/TSV file without a header row; {path} is "
                "not one: remove it"
            )
        info: dict[str, Any] = {"task": self.name, "path": str(path)}
        examples = self.read(path, None if path2 is None else storage.path(path2), opts, info)
        if not examples:
            raise UserError(f"{path} holds no usable {self.name} examples: check the file and the [task] field names")
        info["examples"] = len(examples)
        return examples, info

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
        """The file's Examples; what it found (counts, labels, skipped records) goes into `info`."""
        raise NotImplementedError

    def check_labels(self, examples: Sequence[Example], labels: Sequence[str]) -> None:
        """Raise a UserError when `examples` hold a label that training never saw (only classify has labels)."""

    # ---- Examples -> tokens -----------------------------------------------------------------------------

    def chat_template(self, tokenizer) -> str:
        """The Jinja chat template its prompts are rendered with for this tokenizer, stored with the model
        (instruct); "" for a kind whose prompts are not chats."""
        return ""

    def parts(self, example: Example) -> list[tuple[str, str]]:
        """The example's full text (prompt + target) as (text, role) parts: head, the input, tail, target."""
        head, text, tail = example.meta["prompt_parts"]
        return [(head, PROMPT), (text, CONTEXT), (tail, PROMPT), (example.target, TARGET)]

    def trainable(self, example: Example) -> bool:
        """False for an example that training must leave out (evaluation still scores it)."""
        return True

    def encode(
        self, examples: Sequence[Example], tokenizer, seq_len: int, opts: TaskOptions, *, source: str = ""
    ) -> dict[str, np.ndarray]:
        """Training windows of the examples: see layout.encode."""
        parts, trainable = [self.parts(e) for e in examples], [self.trainable(e) for e in examples]
        return layout.encode(parts, trainable, tokenizer, seq_len, opts, source=source)

    def generation_prompts(
        self, examples: Sequence[Example], tokenizer, seq_len: int, opts: TaskOptions
    ) -> list[list[list[int]]]:
        """Token ids to generate from, per example: see layout.generation_prompts."""
        return layout.generation_prompts([self.parts(e) for e in examples], self.windowed, tokenizer, seq_len, opts)

    # ---- evaluation -------------------------------------------------------------------------------------

    def extract_answer(self, generated: str) -> str:
        """The answer in a generated continuation, as the metrics expect it."""
        return generated.split(END_OF_TURN)[0].strip()

    def predict(self, examples: Sequence[Example], labels: Sequence[str], model: Predictor) -> dict[str, str] | None:
        """{example id: predicted text}, or None for a kind scored by the model's loss instead."""
        return model.generate(self, examples)

    def select(self, examples: list[Example], settings: EvalSettings) -> list[Example]:
        """The examples to predict and score: the first settings.max_examples of them (0: all)."""
        return examples[: settings.max_examples] if settings.max_examples else examples

    def read_predictions(self, path: Path) -> dict[str, str]:
        """{example id: prediction} from JSONL lines with `id` and `prediction`."""
        return jsonl_predictions(path, predictions_text(path))

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        """The kind's metrics of {example id: predicted text} over the examples."""
        raise NotImplementedError


def simple_example(task: str, id_: str, prompt: tuple[str, str, str], target: str) -> Example:
    """An example whose prompt is head + " " + input + tail and whose target is " " + target."""
    head, text, tail = prompt
    # The prompt's parts stay in meta: the input is the part that the layout cuts when it is too long.
    parts = (head, " " + text, tail)
    return Example(
        task=task,
        id=id_,
        prompt="".join(parts),
        target=" " + target,
        references=(target,),
        meta={"prompt_parts": parts},
    )


def predictions_and_references(examples: Sequence[Example], predictions: dict[str, str]) -> tuple[list[str], list[str]]:
    """Each example's prediction ("" when it has none) and its reference, in the examples' order."""
    preds = [predictions.get(e.id, "") for e in examples]
    golds = [e.references[0] if e.references else "" for e in examples]
    return preds, golds


def answer_line(generated: str) -> str:
    """The first line of a generated answer: a short answer ends where the model starts a new line."""
    return generated.split(END_OF_TURN)[0].strip().split("\n")[0].strip()


def check_unique_ids(ids: Sequence[str], path: Path, what: str = "examples") -> None:
    """Refuse two examples (or questions) with one id: predictions are matched by id, so both would get one
    prediction and the score would change without a word."""
    first: dict[str, int] = {}
    for number, id_ in enumerate(ids, start=1):
        if id_ in first:
            raise UserError(
                f"{path}: {what} {first[id_]} and {number} both have the id {id_!r}, and predictions are matched by "
                f"id: give every one its own id (one without an id is numbered by its position)"
            )
        first[id_] = number


def predictions_text(path: Path) -> str:
    """A predictions file's text, as task files are read (a byte-order mark dropped), or a UserError."""
    return read_text(path, "predictions")


def jsonl_predictions(path: Path, text: str) -> dict[str, str]:
    """{id: prediction} of JSONL lines with `id` and `prediction` (the predictions.jsonl evaluate writes)."""
    out = {}
    for number, line in enumerate(lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = prediction_text(row["prediction"], f"{path}:{number}")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not a JSON object with `id` and `prediction`") from None
    return out


def prediction_text(value, where: str) -> str:
    """A prediction as the metrics read it: a string, or a number (a class label written as one). A null would
    otherwise be scored as the word "None"."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    shown = "null" if value is None else type(value).__name__
    raise UserError(f'{where}: the prediction is {shown}, not text: write "" for no answer')
