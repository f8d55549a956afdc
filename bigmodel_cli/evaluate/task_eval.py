"""`bigmodel evaluate --task TASK`: generate predictions for a task file and score them with the field's metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bigmodel_cli import atomic, config, modelio, taskinfo
from bigmodel_cli.console import track
from bigmodel_cli.data import task_records, tasks
from bigmodel_cli.data.tokenizer import Tokenizer
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate import metrics as M
from bigmodel_cli.evaluate import qa_metrics
from bigmodel_cli.evaluate.generate import Sampling, generate_ids


def score(task: str, examples: list, predictions: dict[str, str], labels: list[str], opts: tasks.TaskOptions) -> dict:
    """The metrics of a classify, summarize or translate task for {example id: predicted text}."""
    preds = [predictions.get(e.id, "") for e in examples]
    golds = [e.references[0] if e.references else "" for e in examples]
    if task == "classify":
        return {
            "accuracy": 100 * M.accuracy(preds, golds),
            "macro_f1": 100 * M.macro_f1(preds, golds, labels or None),
            "total": len(examples),
        }
    if task == "summarize":
        return {**M.rouge(preds, golds), "total": len(examples)}
    if task == "translate":
        # A language name we can't place (the default "German" on a Chinese test set) yields to the script
        # of the references: Chinese or Japanese references are never cut into words by 13a.
        named = opts.target_lang if M.bleu_tokenizer(opts.target_lang, golds) != "13a" else None
        return {**M.bleu(preds, golds, named), "chrf": M.chrf(preds, golds), "total": len(examples)}
    raise UserError(f"--predictions is not supported for --task {task}: it is scored by loss and perplexity")


def read_predictions(task: str, path: Path) -> dict[str, str]:
    """SQuAD's {id: answer} JSON for qa; JSONL lines with `id` and `prediction` for the other tasks."""
    if not Path(path).is_file():
        raise UserError(f"predictions file {path} not found")
    text = Path(path).read_text(encoding="utf-8")
    if task == "qa" and text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err.msg}): expected SQuAD's {{id: answer}}") from None
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = str(row["prediction"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not a JSON object with `id` and `prediction`") from None
    return out


def _logprobs(
    loaded, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8, progress: str = ""
) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation after its prompt, batched at one shape."""
    length = loaded.model_cfg.max_seq_len
    model = nnx.merge(loaded.graphdef, loaded.params)

    @jax.jit
    def token_logprobs(tokens):  # [B,L] -> log p(tokens[:, t+1] | tokens[:, :t+1]) [B,L-1]
        logp = jax.nn.log_softmax(model(tokens[:, :-1]), axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    out = []
    starts = range(0, len(pairs), batch_size)
    for start in track(starts, progress, len(starts)) if progress else starts:
        chunk = pairs[start : start + batch_size]
        tokens = np.zeros((batch_size, length + 1), np.int32)
        spans = []
        for row, (prompt, cont) in enumerate(chunk):
            prompt = prompt[-max(1, length + 1 - len(cont)) :]  # keep the prompt's end if it must be cut
            seq = (prompt + cont)[: length + 1]
            tokens[row, : len(seq)] = seq
            spans.append((len(prompt) - 1, len(seq) - 1))
        logp = np.asarray(token_logprobs(tokens))
        out += [(float(logp[row, a:b].sum()), b - a) for row, (a, b) in enumerate(spans)]
    return out


def _classify(loaded, tokenizer, examples, labels: list[str], batch_size: int) -> dict[str, str]:
    """Each example's label: the one the model finds most likely (no free generation to parse)."""
    if not labels:
        raise UserError("no label set: evaluate a model finetuned on this task, or data with labels")
    pairs = []
    for e in examples:
        prompt = tokenizer.encode([e.prompt])[0]
        for label in labels:
            full = tokenizer.encode([e.prompt + " " + label])[0]
            same = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
            pairs.append(([tokenizer.eos_id, *full[:same]], [*full[same:], tokenizer.eos_id]))
    scores = [total for total, _ in _logprobs(loaded, pairs, batch_size, progress="score labels")]
    k = len(labels)
    return {e.id: labels[int(np.argmax(scores[i * k : (i + 1) * k]))] for i, e in enumerate(examples)}


def _generate(loaded, tokenizer, examples, opts: tasks.TaskOptions, seq_len: int, batch_size: int) -> dict[str, str]:
    windows = tasks.generation_prompts(examples, tokenizer, seq_len, opts)
    flat = [(i, w) for i, ws in enumerate(windows) for w in ws]
    sampling = Sampling(max_new_tokens=opts.max_target_tokens, temperature=0.0)
    pad_to = max(len(w) for _, w in flat)
    outputs: list[list[int]] = []
    for start in track(range(0, len(flat), batch_size), "generate", -(-len(flat) // batch_size)):
        chunk = [w for _, w in flat[start : start + batch_size]]
        filler = [[tokenizer.eos_id]] * (batch_size - len(chunk))  # a fixed batch shape: one compilation
        outputs += generate_ids(loaded, chunk + filler, sampling, tokenizer.eos_id, pad_to=pad_to)[: len(chunk)]
    texts = [tokenizer.decode([t for t in ids if t != tokenizer.eos_id]) for ids in outputs]
    answers = [tasks.extract_answer(examples[0].task, text) for text in texts]
    by_example: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(flat):
        by_example.setdefault(i, []).append(k)
    predictions = {}
    for i, ks in by_example.items():
        candidates = [k for k in ks if answers[k]] or ks[:1]
        if len(candidates) > 1:  # qa windows: keep the answer the model is most sure of (mean log-prob)
            scored = _logprobs(loaded, [(flat[k][1], outputs[k]) for k in candidates], batch_size)
            candidates = [candidates[int(np.argmax([t / max(n, 1) for t, n in scored]))]]
        predictions[examples[i].id] = answers[candidates[0]]
    return predictions


def _loss(loaded, tokenizer, examples, opts, seq_len: int, batch_size: int, source: str) -> dict:
    encoded = tasks.encode(examples, tokenizer, seq_len, opts, source=source)
    model = nnx.merge(loaded.graphdef, loaded.params)

    @jax.jit
    def sums(inputs, targets, weights):
        losses = optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets)
        return jnp.sum(losses * weights), jnp.sum(weights)

    total = count = 0.0
    n = len(encoded["inputs"])
    for start in range(0, n, batch_size):
        ids = np.arange(start, start + batch_size)
        valid = ids < n
        ids = np.where(valid, ids, 0)
        s, c = sums(encoded["inputs"][ids], encoded["targets"][ids], encoded["weights"][ids] * valid[:, None])
        total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": M.perplexity(loss), "tokens": int(count), "total": n}


def _write(out_dir: Path, examples, predictions: dict[str, str] | None, metrics: dict) -> None:
    """predictions.jsonl and metrics.json in out_dir; a directory that refuses them costs a warning, not the results."""
    tmp = out_dir / ".predictions.jsonl.tmp"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if predictions is not None:
            with open(tmp, "w", encoding="utf-8") as f:
                for e in examples:
                    row = {"id": e.id, "prediction": predictions.get(e.id, ""), "references": list(e.references)}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, out_dir / "predictions.jsonl")
        atomic.write_json(out_dir / "metrics.json", metrics)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        print(
            f"warning: could not write metrics.json in {out_dir} ({err.strerror or err}): pass --out DIR to save them",
            file=sys.stderr,
        )


@dataclass(frozen=True)
class TaskOverrides:
    """The sections `evaluate --task ... --set KEY=VALUE` may override: the task's prompt options."""

    task: tasks.TaskOptions = field(default_factory=tasks.TaskOptions)


def task_options(task: str, info: taskinfo.TaskInfo | None, overrides: list[str]) -> tasks.TaskOptions:
    """The options the model was finetuned with (when it was, for this task), with `--set task.*` on top."""
    base = info.options if info is not None and info.task == task else tasks.TaskOptions()
    # task.columns describes the training file, not the model: a file evaluated now names its own (--columns).
    base = dataclasses.replace(base, columns="")
    raw = {"task": dataclasses.asdict(base)}
    return config.build_config(raw, config.parse_overrides(overrides), TaskOverrides, Path.cwd(), "--set").task


def run(
    task: str,
    data: Path,
    *,
    model: Path | None = None,
    data2: Path | None = None,
    predictions: Path | None = None,
    out: Path | None = None,
    overrides: list[str] | None = None,
    metric: str = "auto",
    batch_size: int = 8,
    max_examples: int = 0,
) -> dict:
    """Score predictions (given, or generated by the model) for a task file; writes metrics.json."""
    if task not in tasks.TASKS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(tasks.TASKS)}")
    if metric not in qa_metrics.QA_METRICS:
        raise UserError(f"--metric must be one of {', '.join(qa_metrics.QA_METRICS)}; got {metric!r}")
    if metric != "auto" and task != "qa":
        raise UserError(f"--metric chooses the qa metric (squad or cmrc2018); --task {task} has fixed metrics")
    if model is None and predictions is None:
        raise UserError("pass a MODEL to generate predictions, or --predictions FILE to score existing ones")
    loaded = modelio.load(model) if model is not None else None
    home = loaded.home if loaded is not None else Path(predictions).parent
    info = taskinfo.read(home)
    opts = task_options(task, info, overrides or [])
    labels = list(info.labels) if info is not None and info.task == task else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", tasks.TaskWarning)
        examples, data_info = tasks.load_examples(task, Path(data), opts, path2=data2)
        question_ids = None
        if task == "qa":
            dataset = task_records.read_json(Path(data), "SQuAD-format JSON")  # as load_examples read it
            question_ids = qa_metrics.question_ids(dataset)
            question_ids = question_ids[:max_examples] if max_examples else question_ids
            wanted = set(question_ids)
            examples = [e for e in examples if e.id in wanted]
        elif max_examples:
            examples = examples[:max_examples]
        if task == "classify" and labels:
            tasks.check_labels(examples, labels)
        labels = labels or data_info.get("labels", [])
        seq_len = (info.seq_len if info is not None and info.task == task else 0) or (loaded.seq_len if loaded else 0)
        if predictions is not None:
            preds = read_predictions(task, predictions)
        elif task == "instruct":
            preds = None
        elif task == "classify":
            preds = _classify(loaded, Tokenizer(loaded.tokenizer_file), examples, labels, batch_size)
        else:
            tokenizer = Tokenizer(loaded.tokenizer_file)
            preds = _generate(loaded, tokenizer, examples, opts, seq_len, batch_size)
        if preds is None:
            tokenizer = Tokenizer(loaded.tokenizer_file)
            metrics = _loss(loaded, tokenizer, examples, opts, seq_len, batch_size, str(data))
        elif task == "qa":
            metrics = qa_metrics.qa_scores(dataset, preds, metric=metric, question_ids=question_ids)
        else:
            metrics = score(task, examples, preds, labels, opts)
    for warning in caught:  # skipped or cut data: one line each, after the results are in
        print(f"warning: {warning.message}", file=sys.stderr)
    metrics = {"task": task, "data": str(data), **metrics}
    _write(out or home / f"eval-{task}", examples, preds, metrics)
    return metrics
