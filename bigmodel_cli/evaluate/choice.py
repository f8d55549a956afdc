"""`bigmodel evaluate MODEL --task choice`: multiple-choice benchmarks scored by log-likelihood, the way
lm-evaluation-harness scores them (acc, acc_norm and their standard errors; docs/evaluation.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from bigmodel_cli import atomic, modelio, rundir, storage
from bigmodel_cli.data.tokenizer import AnyTokenizer
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate.loglik import logprobs
from bigmodel_cli.model import quantize as quantization
from bigmodel_cli.model.params import LoadedModel
from bigmodel_cli.tasks import choice_files
from bigmodel_cli.tasks.choice_files import TARGET_DELIMITER, ChoiceItem

TASK = "choice"
DEFAULT_FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed


def encode_pair(tokenizer: AnyTokenizer, context_ids: list[int], context: str, continuation: str) -> list[int]:
    """The continuation's ids as the harness's `hf` backend splits them: the context's trailing whitespace
    moves to the continuation, context + continuation is encoded whole (special tokens as the tokenizer adds
    them), and the continuation is what follows the context's own encoding (`context_ids`)."""
    whole = tokenizer.encode_prompt(context + continuation)
    return whole[len(context_ids) :]


def _pairs(tokenizer: AnyTokenizer, items: list[ChoiceItem], contexts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of every choice of every item, in order; each context encoded once."""
    pairs = []
    for item, context in zip(items, contexts, strict=True):
        spaces = len(context) - len(context.rstrip())
        head, moved = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
        context_ids = tokenizer.encode_prompt(head)
        for choice in item.choices:
            continuation = moved + TARGET_DELIMITER + choice
            pairs.append((context_ids, encode_pair(tokenizer, context_ids, head, continuation)))
    return pairs


def mean_stderr(values: list[float]) -> float | None:
    """The standard error of a mean as the harness computes it: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None  # undefined for one item (the harness reports N/A)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def score(items: list[ChoiceItem], loglikelihoods: list[list[float]]) -> tuple[dict, list[dict]]:
    """acc, acc_norm (log-likelihood / choice length in characters, the harness's acc_norm), their standard
    errors and the item count; and one prediction row per item."""
    acc, acc_norm, rows = [], [], []
    for item, lls in zip(items, loglikelihoods, strict=True):
        lengths = np.array([float(len(c)) for c in item.choices])
        chosen = int(np.argmax(lls))
        chosen_norm = int(np.argmax(np.array(lls) / lengths))
        acc.append(float(chosen == item.gold))
        acc_norm.append(float(chosen_norm == item.gold))
        rows.append(
            {
                "row": item.where,
                "item": item.record,
                "choices": list(item.choices),
                "loglikelihoods": lls,
                "chosen": chosen,
                "chosen_norm": chosen_norm,
                "gold": item.gold,
            }
        )
    metrics = {
        "acc": sum(acc) / len(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "total": len(items),  # items scored, the key every task uses
    }
    return metrics, rows


def load_items(
    data: Path,
    fewshot_data: Path | None,
    num_fewshot: int,
    fewshot_seed: int | None,
    max_examples: int,
    columns: str | None,
) -> tuple[str, list[ChoiceItem], list[str]]:
    """(layout, the items evaluated, each one's full context); every row checked before a model loads.

    The few-shot examples of MMLU-layout files are the first K (the harness's first_n sampler, which its
    mmlu, ceval and cmmlu tasks use), refusing a seed; the others' are drawn with the seed (default 1234)."""
    if num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    layout, items, cue = choice_files.load(storage.path(data), columns)
    pool = items  # the whole file: --max-examples limits what is scored, not where shots come from (as the harness)
    if fewshot_data is not None:
        shot_layout, pool, _ = choice_files.load(storage.path(fewshot_data), columns, cue=cue)
        if shot_layout != layout:
            raise UserError(f"--fewshot-data is {shot_layout} layout but --data is {layout}: pass the same layout")
    items = items[:max_examples] if max_examples > 0 else items
    if layout in choice_files.FIRST_N_LAYOUTS:
        if fewshot_seed is not None:
            raise UserError(
                f"--fewshot-seed has no effect on {layout}-layout files: their few-shot examples are the first "
                "K in file order, as lm-evaluation-harness takes them; remove it"
            )
    elif fewshot_seed is None:
        fewshot_seed = DEFAULT_FEWSHOT_SEED
    contexts = choice_files.contexts(items, pool, num_fewshot, fewshot_seed, same_file=fewshot_data is None)
    return layout, items, contexts


def _write(out_dir: Path, rows: list[dict], metrics: dict) -> None:
    """predictions.jsonl and metrics.json; a directory that refuses them costs a warning, not the results."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic.write_text(out_dir / rundir.PREDICTIONS_FILE, text)
        atomic.write_json(out_dir / rundir.EVAL_METRICS_FILE, metrics)
    except OSError as err:
        print(f"warning: could not write results in {out_dir} ({err.strerror or err}): pass --out DIR", file=sys.stderr)


def run(
    model: Path,
    data: Path,
    *,
    fewshot_data: Path | None = None,
    num_fewshot: int = 0,
    fewshot_seed: int | None = None,
    batch_size: int = 8,
    max_examples: int = 0,
    out: Path | None = None,
    quantize: str = "",
    columns: str | None = None,
    loaded: LoadedModel | None = None,
) -> dict:
    """Score every item's choices by the summed log-likelihood of " " + choice after its context; writes
    predictions.jsonl and metrics.json (to `out`, else the model's eval-choice/) and returns the metrics.

    fewshot_seed None: the default, 1234, for layouts that draw few-shot examples at random; MMLU-layout files
    take the first K and refuse a seed. `loaded`: the model, already loaded (and quantized), to skip loading it
    again (a suite)."""
    quantization.check(quantize)
    layout, items, contexts = load_items(data, fewshot_data, num_fewshot, fewshot_seed, max_examples, columns)
    first_n = layout in choice_files.FIRST_N_LAYOUTS
    loaded = loaded or quantization.apply(modelio.load(model), quantize)
    tokenizer = loaded.tokenizer("multiple-choice evaluation needs the model's tokenizer")
    pairs = _pairs(tokenizer, items, contexts)
    scored = logprobs(loaded, pairs, batch_size, progress="score choices")
    loglikelihoods, at = [], 0
    for item in items:
        loglikelihoods.append([total for total, _ in scored[at : at + len(item.choices)]])
        at += len(item.choices)
    metrics, rows = score(items, loglikelihoods)
    metrics = {
        "task": TASK,
        "data": str(data),
        "layout": layout,
        "num_fewshot": num_fewshot,
        "fewshot_sampler": "first_n" if first_n else "default",
        "fewshot_seed": None if first_n else DEFAULT_FEWSHOT_SEED if fewshot_seed is None else fewshot_seed,
        **metrics,
    }
    _write(storage.path(out) if out is not None else rundir.eval_dir(loaded.home, TASK), rows, metrics)
    return metrics
