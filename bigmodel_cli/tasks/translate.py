"""Translation from two line-aligned text files (Tatoeba, Multi30k) or JSONL source/target records.

    prompt  "Translate {src} to {tgt}.\n{src}: {source}\n{tgt}:"     target  " {target}"

Scores are BLEU (tokenized for the target language) and chrF.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import metrics as M
from bigmodel_cli.tasks import records as R
from bigmodel_cli.tasks.base import EvalSettings, Task, predictions_and_references, simple_example
from bigmodel_cli.tasks.options import Example, TaskOptions


class Translate(Task):
    name = "translate"
    paired_files = True

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
        if path2 is not None:
            sources = R.lines(R.read_text(path, f"{opts.source_lang} text"))
            targets = R.lines(R.read_text(path2, f"{opts.target_lang} text"))
            if len(sources) != len(targets):
                raise UserError(
                    f"{path} has {len(sources)} lines but {path2} has {len(targets)}: the two translate files "
                    "must be line-aligned (line i of one translates line i of the other)"
                )
            numbered = enumerate(zip(sources, targets, strict=True), start=1)
            pairs = [(str(i), s.strip(), t.strip()) for i, (s, t) in numbered]
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
            examples.append(simple_example(self.name, id_, (head, source, tail), target))
        skipped.report(info)
        return examples

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        """Corpus BLEU (with its signature) and chrF."""
        preds, golds = predictions_and_references(examples, predictions)
        # A language name we can't place (the default "German" on a Chinese test set) yields to the script
        # of the references: Chinese or Japanese references are never cut into words by 13a.
        target_lang = settings.opts.target_lang
        named = target_lang if M.bleu_tokenizer(target_lang, golds) != "13a" else None
        return {**M.bleu(preds, golds, named), "chrf": M.chrf(preds, golds), "total": len(examples)}
