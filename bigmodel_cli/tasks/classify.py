"""Text classification from JSONL, CSV or TSV (with or without a header row).

    prompt  "Text: {text}\nLabel:"     target  " {label}"

The model predicts by choosing the label it finds most likely (no free text to parse); scores are accuracy and
macro F1 over the label set, which comes from the training data (or task.label_names' words).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import metrics as M
from bigmodel_cli.tasks import records as R
from bigmodel_cli.tasks.base import (
    EvalSettings,
    Predictor,
    Task,
    answer_line,
    predictions_and_references,
    simple_example,
)
from bigmodel_cli.tasks.options import Example, TaskOptions


def _label_order(label: str) -> tuple:
    """Sort key for labels: integers numerically (2 before 10) and first, others as text."""
    try:
        return (0, int(label), label)
    except ValueError:
        return (1, 0, label)


class Classify(Task):
    name = "classify"

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
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
            examples.append(simple_example(self.name, line, ("Text:", text, "\nLabel:"), label))
        # The label set comes from the data (or task.label_names' words); the run stores it for evaluation.
        info.update(labels=sorted({e.references[0] for e in examples}, key=_label_order))
        skipped.report(info)
        return examples

    def check_labels(self, examples: Sequence[Example], labels: Sequence[str]) -> None:
        """Raise a UserError naming any label of `examples` that is not among the trained `labels`."""
        known = set(labels)
        unseen = sorted({e.references[0] for e in examples} - known, key=_label_order)
        if unseen:
            shown = ", ".join(repr(x) for x in unseen[:3]) + (", ..." if len(unseen) > 3 else "")
            raise UserError(
                f"label {shown} was never seen in training (trained labels: {', '.join(labels)}): evaluate on "
                "data with the same labels, or map them onto these with task.label_names"
            )

    def extract_answer(self, generated: str) -> str:
        return answer_line(generated)

    def predict(self, examples: Sequence[Example], labels: Sequence[str], model: Predictor) -> dict[str, str]:
        """Each example's label: the one the model finds most likely after the prompt."""
        if not labels:
            raise UserError("no label set: evaluate a model finetuned on this task, or data with labels")
        # The continuations are the labels as training wrote them: " {label}" after the prompt.
        picked = model.choose(examples, [" " + label for label in labels])
        return {id_: labels[i] for id_, i in picked.items()}

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        """Accuracy and macro F1 (percentages; macro F1 over the gold and predicted labels, as scikit-learn)."""
        preds, golds = predictions_and_references(examples, predictions)
        return {
            "accuracy": 100 * M.accuracy(preds, golds),
            "macro_f1": 100 * M.macro_f1(preds, golds),
            "total": len(examples),
        }
