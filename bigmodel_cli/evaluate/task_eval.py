"""`bigmodel evaluate --task TASK`: generate predictions for a task file and score them with the field's metrics."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigmodel_cli import atomic, config, modelio, rundir, storage, tasks
from bigmodel_cli.console import track
from bigmodel_cli.data import loader
from bigmodel_cli.data.tokenizer import AnyTokenizer, sequence_start
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate.generate import Sampling, generate_ids, stop_ids
from bigmodel_cli.evaluate.loglik import logprobs
from bigmodel_cli.evaluate.loss import loss_sums
from bigmodel_cli.model import quantize as quantization
from bigmodel_cli.model.params import LoadedModel
from bigmodel_cli.tasks import taskinfo
from bigmodel_cli.tasks.base import EvalSettings, Task, check_unique_ids
from bigmodel_cli.tasks.metrics import perplexity
from bigmodel_cli.tasks.options import Example, TaskOptions, TaskWarning
from bigmodel_cli.tasks.qa_metrics import QA_METRICS


@dataclass(frozen=True)
class _ModelPredictor:
    """A loaded model's predictions for Task.predict: greedy generation, or the likeliest of some continuations."""

    loaded: LoadedModel
    tokenizer: AnyTokenizer
    opts: TaskOptions
    seq_len: int
    batch_size: int

    def choose(self, examples: list[Example], continuations: list[str]) -> dict[str, int]:
        """Each example's continuation (index) that the model finds most likely (no free generation to parse)."""
        tokenizer = self.tokenizer
        first = sequence_start(tokenizer)  # BOS where the model's tokenizer adds one, else EOS as in training
        pairs = []
        for e in examples:
            prompt = tokenizer.encode([e.prompt])[0]
            for continuation in continuations:
                full = tokenizer.encode([e.prompt + continuation])[0]
                same = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
                pairs.append(([first, *full[:same]], [*full[same:], tokenizer.eos_id]))
        scores = [total for total, _ in logprobs(self.loaded, pairs, self.batch_size, progress="score labels")]
        k = len(continuations)
        return {e.id: int(np.argmax(scores[i * k : (i + 1) * k])) for i, e in enumerate(examples)}

    def generate(self, kind: Task, examples: list[Example]) -> dict[str, str]:
        """Each example's answer, generated greedily; of several windows' answers, the one the model is surest of."""
        loaded, tokenizer, batch_size = self.loaded, self.tokenizer, self.batch_size
        windows = kind.generation_prompts(examples, tokenizer, self.seq_len, self.opts)
        flat = [(i, w) for i, ws in enumerate(windows) for w in ws]
        sampling = Sampling(max_new_tokens=self.opts.max_target_tokens, temperature=0.0)
        pad_to = max(len(w) for _, w in flat)
        stops, outputs = stop_ids(loaded, tokenizer), []
        for start in track(range(0, len(flat), batch_size), "generate", -(-len(flat) // batch_size)):
            chunk = [w for _, w in flat[start : start + batch_size]]
            filler = [[tokenizer.eos_id]] * (batch_size - len(chunk))  # a fixed batch shape: one compilation
            outputs += generate_ids(loaded, chunk + filler, sampling, stops, pad_to=pad_to)[: len(chunk)]
        texts = [tokenizer.decode([t for t in ids if t not in stops]) for ids in outputs]
        answers = [kind.extract_answer(text) for text in texts]
        by_example: dict[int, list[int]] = {}
        for k, (i, _) in enumerate(flat):
            by_example.setdefault(i, []).append(k)
        predictions = {}
        for i, ks in by_example.items():
            candidates = [k for k in ks if answers[k]] or ks[:1]
            if len(candidates) > 1:  # qa windows: keep the answer the model is most sure of (mean log-prob)
                scored = logprobs(loaded, [(flat[k][1], outputs[k]) for k in candidates], batch_size)
                candidates = [candidates[int(np.argmax([t / max(n, 1) for t, n in scored]))]]
            predictions[examples[i].id] = answers[candidates[0]]
        return predictions


def _loss(kind: Task, loaded, tokenizer, examples, opts, seq_len: int, batch_size: int, source: str) -> dict:
    encoded = kind.encode(examples, tokenizer, seq_len, opts, source=source)
    total, count = loss_sums(loaded, loader.array_batches(encoded, batch_size))
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(count), "total": len(encoded["inputs"])}


def _write(out_dir: Path, examples, predictions: dict[str, str] | None, metrics: dict) -> None:
    """predictions.jsonl and metrics.json in out_dir; a directory that refuses them costs a warning, not the results."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if predictions is not None:
            rows = (
                {"id": e.id, "prediction": predictions.get(e.id, ""), "references": list(e.references)}
                for e in examples
            )
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            atomic.write_text(out_dir / rundir.PREDICTIONS_FILE, text)
        atomic.write_json(out_dir / rundir.EVAL_METRICS_FILE, metrics)
    except OSError as err:
        print(
            f"warning: could not write metrics.json in {out_dir} ({err.strerror or err}): pass --out DIR to save them",
            file=sys.stderr,
        )


@dataclass(frozen=True)
class TaskOverrides:
    """The sections `evaluate --task ... --set KEY=VALUE` may override: the task's prompt options."""

    task: TaskOptions = field(default_factory=TaskOptions)


def _finetuned_for(name: str, info: taskinfo.TaskInfo | None) -> taskinfo.TaskInfo | None:
    """The model's task info when it was finetuned for the task `name`; None for another task or none."""
    return info if info is not None and name == info.task else None


def task_options(
    task: str, info: taskinfo.TaskInfo | None, overrides: list[str], columns: str | None = None
) -> TaskOptions:
    """The options the model was finetuned with (when it was, for this task), then --columns, then `--set task.*`."""
    trained = _finetuned_for(task, info)
    base = trained.options if trained is not None else TaskOptions()
    # task.columns describes the training file, not the model: a file evaluated now names its own (--columns).
    base = dataclasses.replace(base, columns="")
    raw = {"task": dataclasses.asdict(base)}
    values = {"task": {"columns": columns}} if columns is not None else None
    return config.build_config(
        raw, config.parse_overrides(overrides), TaskOverrides, Path.cwd(), "--set", values=values
    ).task


def run(
    task: str,
    data: Path,
    *,
    model: Path | None = None,
    data2: Path | None = None,
    predictions: Path | None = None,
    out: Path | None = None,
    overrides: list[str] | None = None,
    columns: str | None = None,
    metric: str = "auto",
    batch_size: int = 8,
    max_examples: int = 0,
    quantize: str = "",
    loaded: LoadedModel | None = None,
) -> dict:
    """Score predictions (given, or generated by the model, quantized as --quantize asks) for a task file;
    writes metrics.json. `loaded`: the model, already loaded (and quantized), to skip loading it again."""
    quantization.check(quantize)
    kind = tasks.get(task)
    if kind.pairs:  # scored by evaluate/preference.py, which `evaluate --task preference` runs
        raise UserError(f"--task {task} is scored by `bigmodel evaluate MODEL --task {task} --data FILE`")
    if metric not in QA_METRICS:
        raise UserError(f"--metric must be one of {', '.join(QA_METRICS)}; got {metric!r}")
    if metric not in ("auto", *kind.metric_choices):
        raise UserError(f"--metric chooses the qa metric (squad or cmrc2018); --task {task} has fixed metrics")
    if model is None and predictions is None:
        raise UserError("pass a MODEL to generate predictions, or --predictions FILE to score existing ones")
    if loaded is None:
        loaded = modelio.load(model) if model is not None else None
        if loaded is not None and predictions is None:
            loaded = quantization.apply(loaded, quantize)
    home = loaded.home if loaded is not None else storage.path(predictions).parent
    info = taskinfo.read(home)
    opts = task_options(task, info, overrides or [], columns)
    trained = _finetuned_for(task, info)
    trained_labels = list(trained.labels) if trained is not None else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TaskWarning)
        examples, data_info = kind.load(storage.path(data), opts, path2=data2)
        labels = tuple(trained_labels or data_info.get("labels", []))
        settings = EvalSettings(storage.path(data), opts, labels=labels, metric=metric, max_examples=max_examples)
        examples = kind.select(examples, settings)
        if kind.keyed_by_id:
            check_unique_ids([e.id for e in examples], storage.path(data), kind.units)
        if trained_labels:
            kind.check_labels(examples, trained_labels)
        seq_len = (trained.seq_len if trained is not None else 0) or (loaded.seq_len if loaded else 0)
        missing = 0
        if predictions is not None:
            preds = kind.read_predictions(predictions)
            ids = {e.id for e in examples}
            if missing := len(ids - preds.keys()):
                where = f"{missing} of {len(ids)} examples have no prediction in {predictions}"
                warnings.warn(TaskWarning(f"{where}: each is scored as an empty answer"), stacklevel=2)
        else:
            tokenizer = loaded.tokenizer("evaluation needs the model's tokenizer")
            tokenizer.chat_template = taskinfo.chat_template(info, tokenizer)  # chats as the model was trained
            predictor = _ModelPredictor(loaded, tokenizer, opts, seq_len, batch_size)
            preds = kind.predict(examples, labels, predictor)
        if preds is None:  # a kind scored by loss
            metrics = _loss(kind, loaded, predictor.tokenizer, examples, opts, seq_len, batch_size, str(data))
        else:
            metrics = kind.score(examples, preds, settings)
            if predictions is not None:
                metrics.setdefault("missing", missing)
    for warning in caught:  # skipped or cut data: one line each, after the results are in
        print(f"warning: {warning.message}", file=sys.stderr)
    metrics = {"task": task, "data": str(data), **metrics}
    out_dir = storage.path(out) if out is not None else rundir.eval_dir(home, task)
    _write(out_dir, examples, preds, metrics)
    return metrics
