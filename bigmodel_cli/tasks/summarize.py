"""Summarization from JSONL (or CSV/TSV): a document and its reference summary per record.

    prompt  "Document: {document}\nSummary:"     target  " {summary}"

A too-long document is cut at its end; scores are ROUGE-1/2/L F-measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bigmodel_cli.tasks import metrics as M
from bigmodel_cli.tasks import records as R
from bigmodel_cli.tasks.base import EvalSettings, Task, predictions_and_references, simple_example
from bigmodel_cli.tasks.options import Example, TaskOptions


class Summarize(Task):
    name = "summarize"

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
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
            examples.append(simple_example(self.name, rid, ("Document:", document, "\nSummary:"), summary))
        skipped.report(info)
        return examples

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        """Mean ROUGE-1/2/L F-measures (0-100)."""
        preds, golds = predictions_and_references(examples, predictions)
        return {**M.rouge(preds, golds), "total": len(examples)}
