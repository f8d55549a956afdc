"""Extractive question answering on SQuAD-format JSON (SQuAD v1.1/v2.0, CMRC 2018).

    prompt  "Context: {context}\nQuestion: {question}\nAnswer:"     target  " {answer}" or " unanswerable"

A too-long context is read in windows: training keeps the window that holds the answer, generation reads every
window and keeps the answer the model is surest of. Scores are the official SQuAD or CMRC 2018 EM/F1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks import qa_metrics
from bigmodel_cli.tasks import records as R
from bigmodel_cli.tasks.base import (
    EvalSettings,
    Task,
    answer_line,
    check_unique_ids,
    jsonl_predictions,
    prediction_text,
    predictions_text,
)
from bigmodel_cli.tasks.layout import ANSWER, CONTEXT, PROMPT, TARGET
from bigmodel_cli.tasks.options import Example, TaskOptions

UNANSWERABLE = "unanswerable"  # target of SQuAD v2 questions without an answer; extract_answer maps it to ""
_WHAT = "SQuAD-format JSON"
_SHAPE = '{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}'


def _answer_found(context: str, answer: dict) -> bool:
    """True when the answer's text really stands at its answer_start in the context."""
    start, text = answer.get("answer_start"), answer.get("text")
    if not isinstance(start, int) or not isinstance(text, str) or not text.strip() or start < 0:
        return False
    return context[start : start + len(text)] == text


class QA(Task):
    name = "qa"
    windowed = True
    metric_choices = qa_metrics.QA_METRICS
    units = "questions"

    def read(self, path: Path, path2: Path | None, opts: TaskOptions, info: dict) -> list[Example]:
        data = R.read_json(path, _WHAT)
        articles = data.get("data") if isinstance(data, dict) else data
        if not isinstance(articles, list) or not all(isinstance(a, dict) for a in articles):
            raise UserError(f"{path} is not SQuAD-format JSON: expected {_SHAPE}")
        examples: list[Example] = []
        skipped = R.Skipped(path, "questions")
        bad_starts = no_position = unanswerable = questions = 0
        is_v2 = False
        for article in articles:
            paragraphs = article.get("paragraphs", [])
            if not isinstance(paragraphs, list) or not all(isinstance(p, dict) for p in paragraphs):
                raise UserError(f"{path} is not SQuAD-format JSON: expected {_SHAPE}")
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
                    # Training needs an answer's place in the context, to keep it inside the window; scoring
                    # needs only the texts. So every question is kept, and one without a trusted place has
                    # answer_start None: training leaves it out.
                    good = [a for a in answers if _answer_found(context, a)]
                    bad_starts += len(answers) - len(good)
                    no_position += not impossible and not good
                    unanswerable += impossible
                    first = (good or answers or [None])[0]
                    answer = R.text(first.get("text")) if first else ""
                    examples.append(
                        Example(
                            task=self.name,
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
            raise UserError(f"{path} has no questions: a SQuAD-format file lists them as {_SHAPE}")
        info.update(
            squad_version="2.0" if is_v2 else "1.1",
            questions=questions,
            unanswerable=unanswerable,
            bad_answer_starts=bad_starts,  # answers whose answer_start does not point at their text
            no_answer_position=no_position,  # answerable questions that training leaves out (still scored)
        )
        skipped.report(info)
        return examples

    def parts(self, example: Example) -> list[tuple[str, str]]:
        meta = example.meta
        context, start = meta["context"], meta["answer_start"]
        tail = f"\nQuestion: {meta['question']}\nAnswer:"
        if start is None:
            body = [(" " + context, CONTEXT)]
        else:
            end = start + len(meta["answer"])
            body = [(" " + context[:start], CONTEXT), (context[start:end], ANSWER), (context[end:], CONTEXT)]
        return [("Context:", PROMPT), *body, (tail, PROMPT), (example.target, TARGET)]

    def trainable(self, example: Example) -> bool:
        """False for a question with answers, none of which has an answer_start pointing at its text."""
        return example.meta["answer_start"] is not None or example.meta["is_impossible"]

    def extract_answer(self, generated: str) -> str:
        """The first line of the answer; UNANSWERABLE -> "" as SQuAD v2 scores no answer."""
        text = answer_line(generated)
        return "" if text.lower().rstrip(".") == UNANSWERABLE else text

    def select(self, examples: list[Example], settings: EvalSettings) -> list[Example]:
        """The examples of the file's first settings.max_examples questions (0: all)."""
        if not settings.max_examples:  # ids shared by two questions: refused before generation (task_eval)
            return examples
        wanted = set(_scored_ids(R.read_json(settings.data, _WHAT), settings.max_examples, settings.data))
        return [e for e in examples if e.id in wanted]

    def read_predictions(self, path: Path) -> dict[str, str]:
        """SQuAD's {id: answer} JSON, or JSONL lines with `id` and `prediction` (the predictions.jsonl evaluate
        writes): a .jsonl file, more than one JSON value, or one object holding `id` and `prediction`."""
        text = predictions_text(path)
        if Path(str(path)).suffix == ".jsonl":
            return jsonl_predictions(path, text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":  # a value after the first one: JSONL
                return jsonl_predictions(path, text)
            raise UserError(f"{path} is not valid JSON ({err.msg}): expected SQuAD's {{id: answer}}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} holds a JSON {type(data).__name__}: expected SQuAD's {{id: answer}}")
        if {"id", "prediction"} <= data.keys():  # a one-line JSONL file
            return jsonl_predictions(path, text)
        return {str(k): prediction_text(v, f"{path}: question {k!r}") for k, v in data.items()}

    def score(self, examples: Sequence[Example], predictions: dict[str, str], settings: EvalSettings) -> dict:
        """EM and F1 over the file's questions (the first max_examples), by the official scripts' rules."""
        dataset = R.read_json(settings.data, _WHAT)  # as read() read it
        scored = _scored_ids(dataset, settings.max_examples, settings.data)
        return qa_metrics.qa_scores(dataset, predictions, metric=settings.metric, question_ids=scored)


def _scored_ids(dataset, max_examples: int, path: Path) -> list[str]:
    """The ids of the questions scored, in file order: all of them, or the first max_examples (each id once)."""
    ids = qa_metrics.question_ids(dataset)
    check_unique_ids(ids, path, QA.units)
    return ids[:max_examples] if max_examples else ids
