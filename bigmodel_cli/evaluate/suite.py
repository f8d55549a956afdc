"""`bigmodel evaluate MODEL --suite suite.toml`: several evaluation tasks of one model, one table, one suite.json.

A suite is a TOML list of `[[task]]` tables. Each names its kind and its data and is run by the same code as
`bigmodel evaluate --task KIND` (generation and classification), `evaluate --text/--data` (perplexity) or
`evaluate --task choice`, on the model loaded once. Each task's own outputs go to a folder named after it.
"""

from __future__ import annotations

import dataclasses
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bigmodel_cli import atomic, config, modelio, rundir, storage, tasks
from bigmodel_cli.errors import UserError
from bigmodel_cli.model import quantize as quantization
from bigmodel_cli.model.params import LoadedModel

KINDS = (*tasks.SUPERVISED, "perplexity", "choice")
COUNT_KEYS = ("total", "tokens")  # what a task's n is: examples scored, or tokens for perplexity
# Numbers in metrics.json that score nothing: counts (SQuAD v2's HasAns_total and NoAns_total too), where the
# model was, and the few-shot settings a choice task records beside its scores.
NOT_SCORES = {*COUNT_KEYS, "step", "bytes", "missing", "num_fewshot", "fewshot_seed"}


@dataclass(frozen=True)
class SuiteTask:
    """One `[[task]]` of a suite: what `bigmodel evaluate` would be given for it alone."""

    name: str = ""  # the row label, and the folder of the task's own outputs
    kind: str = ""  # qa, classify, summarize, translate, instruct, perplexity or choice
    # paths: relative ones start at the data root (--data DIR, else the suite file's folder)
    data: str = config._path_field(doc="the task file; perplexity: a preprocessed directory")
    data2: str = config._path_field(doc="translate: target-language file aligned with data")
    text: str = config._path_field(doc="perplexity: a raw text file scored whole")
    fewshot_data: str = config._path_field(doc="choice: the file few-shot examples come from (default: data)")
    split: str = "val"  # perplexity on a preprocessed directory: the split
    max_batches: int = 50  # perplexity on a preprocessed directory: batches to score (0 = all)
    max_examples: int = 0  # score only the first N examples (0 = all)
    batch_size: int = 8  # sequences per batch
    metric: str = "auto"  # qa: squad or cmrc2018 (auto: cmrc2018 for Chinese data, else squad)
    columns: str = ""  # a CSV/TSV without a header row: its column names
    set: tuple[str, ...] = ()  # task options, as `evaluate --task --set`: ["task.target_lang=Chinese"]
    num_fewshot: int = 0  # choice: examples shown before each question
    fewshot_seed: int = 1234  # choice: seed of the few-shot draw


# The keys each kind reads besides name, kind and batch_size: any other would do nothing, so it is refused.
_TASK_KEYS = ("data", "max_examples", "columns", "set")
KIND_KEYS: dict[str, tuple[str, ...]] = {
    **{kind: _TASK_KEYS for kind in tasks.SUPERVISED},
    "qa": (*_TASK_KEYS, "metric"),
    "translate": (*_TASK_KEYS, "data2"),
    "perplexity": ("text", "data", "split", "max_batches"),
    "choice": ("data", "max_examples", "num_fewshot", "fewshot_seed", "fewshot_data"),
}


@dataclass(frozen=True)
class Suite:
    """A parsed suite file: its tasks, with every path resolved against the data root."""

    path: Path
    tasks: tuple[SuiteTask, ...]


def load(path: Path, data_root: Path | None = None) -> Suite:
    """Parse and check a suite file; relative paths resolve against data_root (default: the suite's folder)."""
    path = storage.path(path)
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"--suite {path}: cannot read it ({err.strerror or err})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--suite {path} is not valid TOML: {err}") from None
    unknown = [key for key in raw if key != "task"]
    if unknown:
        raise UserError(f"{where}: unknown top-level key {unknown[0]!r}: a suite holds only [[task]] tables")
    tables = raw.get("task")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UserError(f'{where}: no tasks: add [[task]] tables, each with name, kind and data (see "evaluate")')
    root = storage.path(data_root) if data_root is not None else path.resolve().parent
    parsed = tuple(_task(table, i, root, where) for i, table in enumerate(tables))
    names = [t.name for t in parsed]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated:
        raise UserError(f"{where}: two tasks are named {repeated!r}: give each its own name (its output folder)")
    return Suite(path, parsed)


def _task(table: dict, index: int, root: Path, where: str) -> SuiteTask:
    name = table.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise UserError(f"{where}: task {index + 1} needs a name of letters, digits, '.', '-' or '_', got {name!r}")
    where = f"{where}: task {name!r}"
    settings = table.get("set", [])
    if not isinstance(settings, list) or not all(isinstance(s, str) for s in settings):
        raise UserError(f'{where}: set must be a list of "task.KEY=VALUE" strings, got {settings!r}')
    scalars = {key: value for key, value in table.items() if key != "set"}
    task = config._build_section("task", SuiteTask, scalars, {}, root, where)
    task = dataclasses.replace(task, set=tuple(settings))
    if task.kind not in KINDS:
        raise UserError(f"{where}: kind {task.kind!r} is unknown{config._closest(task.kind, list(KINDS))}")
    allowed = {"name", "kind", "batch_size", *KIND_KEYS[task.kind]}
    stray = [key for key in table if key not in allowed]
    if stray:
        raise UserError(f"{where}: {stray[0]} does nothing for kind {task.kind}: remove it")
    for key in ("batch_size", "max_examples", "max_batches", "num_fewshot"):
        if getattr(task, key) < (1 if key == "batch_size" else 0):
            raise UserError(f"{where}: {key} must be {'positive' if key == 'batch_size' else '>= 0'}")
    if task.kind == "perplexity" and bool(task.text) == bool(task.data):
        raise UserError(f"{where}: perplexity needs one of text (a raw file) or data (a preprocessed directory)")
    if task.kind != "perplexity" and not task.data:
        raise UserError(f"{where}: data is missing: the {task.kind} task's file")
    for key in ("data", "data2", "text", "fewshot_data"):
        value = getattr(task, key)
        if value and not storage.is_url(value) and not Path(value).exists():
            raise UserError(f"{where}: {key} {value} does not exist (relative paths start at {root})")
    return task


def run(model: Path, suite_file: Path, *, data_root: Path | None = None, out: Path | None = None, quantize="") -> dict:
    """Run every task of the suite on the model (loaded once, quantized as --quantize asks); writes suite.json
    and, per task, its own outputs in a folder named after it."""
    suite = load(suite_file, data_root)
    quantization.check(quantize)
    loaded = quantization.apply(modelio.load(model), quantize)
    out_dir = storage.path(out) if out is not None else suite_dir(loaded.home, suite.path)
    rows = []
    for task in suite.tasks:
        start = time.perf_counter()
        try:
            metrics = _run_task(task, model, loaded, out_dir / task.name)
        except UserError as err:
            raise UserError(f"suite task {task.name!r} ({task.kind}): {err}") from None
        rows.append(_row(task, metrics, time.perf_counter() - start))
    result = {"suite": str(suite.path), "model": str(model), "step": loaded.step, "tasks": rows}
    result["table"] = dict(zip(("header", "rows"), table(result), strict=True))  # as printed; `report` shows it
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / rundir.SUITE_FILE, result)
    return result


def suite_dir(home: Path, suite_path: Path) -> Path:
    """Where a suite's results go for a model by default: RUN/eval-suite-NAME (NAME: the suite file's stem)."""
    return rundir.eval_dir(home, f"suite-{suite_path.stem}")


def _run_task(task: SuiteTask, model: Path, loaded: LoadedModel, out: Path) -> dict:
    """One task's metrics, through the code that `bigmodel evaluate` runs for it alone."""
    from bigmodel_cli.evaluate import lm, task_eval

    if task.kind == "perplexity":
        if task.text:
            return lm.run_text(model, path(task.text), batch_size=task.batch_size, out=out, loaded=loaded)
        return lm.run(
            model,
            data=path(task.data),
            split=task.split,
            batch_size=task.batch_size,
            max_batches=task.max_batches,
            out=out,
            loaded=loaded,
        )
    if task.kind == "choice":
        from bigmodel_cli.evaluate import choice

        return choice.run(
            model,
            path(task.data),
            fewshot_data=path(task.fewshot_data),
            num_fewshot=task.num_fewshot,
            # the default seed is choice's own, so that MMLU-layout files (first K shots, no seed) take it too
            fewshot_seed=None if task.fewshot_seed == choice.DEFAULT_FEWSHOT_SEED else task.fewshot_seed,
            batch_size=task.batch_size,
            max_examples=task.max_examples,
            out=out,
            loaded=loaded,
        )
    return task_eval.run(
        task.kind,
        path(task.data),
        model=model,
        data2=path(task.data2),
        out=out,
        overrides=list(task.set),
        columns=task.columns or None,
        metric=task.metric,
        batch_size=task.batch_size,
        max_examples=task.max_examples,
        loaded=loaded,
    )


def path(value: str) -> Path | None:
    """A suite path field as the stages take it: "" (not given) is None."""
    return Path(value) if value else None


def _row(task: SuiteTask, metrics: dict, seconds: float) -> dict:
    """A task's line of the suite: its scores (the numbers of its metrics.json that score the model), n, time."""
    scores = {
        key: value
        for key, value in metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and key not in NOT_SCORES
        and not key.endswith("_total")
    }
    n = next((metrics[key] for key in COUNT_KEYS if key in metrics), None)
    return {"name": task.name, "kind": task.kind, "scores": scores, "n": n, "seconds": seconds, "metrics": metrics}


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The suite as a table: task, kind, metric names, values, n, seconds."""
    header = ["task", "kind", "metric", "value", "n", "seconds"]
    body = [
        [
            row["name"],
            row["kind"],
            " / ".join(row["scores"]),
            " / ".join(f"{value:.4g}" for value in row["scores"].values()),
            "-" if row["n"] is None else str(row["n"]),
            f"{row['seconds']:.1f}",
        ]
        for row in result["tasks"]
    ]
    return header, body


def render(result: dict, as_json: bool = False) -> None:
    """Print the suite's table on stdout (or its result as one JSON object)."""
    import json
    import sys

    from rich.console import Console
    from rich.table import Table

    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    header, body = table(result)
    printed = Table(*header, title=f"{Path(result['suite']).name} on {result['model']}")
    for line in body:
        printed.add_row(*line)
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(printed)
