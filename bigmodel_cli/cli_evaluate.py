"""`bigmodel evaluate`: its options, and the rule that an option which would do nothing in a mode is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bigmodel_cli import storage
from bigmodel_cli.cli_app import (
    MODEL_SOURCES,
    Coordinator,
    Data2,
    NumProcesses,
    ProcessId,
    Quantize,
    _console,
    _setup_jax,
)
from bigmodel_cli.errors import UserError


def evaluate(
    model: Annotated[
        Path | None,
        typer.Argument(parser=storage.parse, help=f"The model: {MODEL_SOURCES}."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(parser=storage.parse, help="Preprocessed data directory, or with --task a task file."),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(
            parser=storage.parse, help="Perplexity and bits per byte of this whole raw text file (UTF-8, or .gz)."
        ),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            help="Score a task: qa, classify, summarize, translate, instruct, choice (multiple choice) or preference."
        ),
    ] = "",
    ref: Annotated[
        Path | None,
        typer.Option(
            parser=storage.parse, help="preference: the reference model for rewards (default: the run's start)."
        ),
    ] = None,
    data2: Data2 = None,
    predictions: Annotated[
        Path | None, typer.Option(parser=storage.parse, help="Score this predictions file instead of generating.")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="qa: squad or cmrc2018 (default: cmrc2018 for Chinese data, else squad).")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="CSV/TSV without a header row: its column names, e.g. label,title,text.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(parser=storage.parse, help="Where metrics.json (and predictions.jsonl) go.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="With --task: override a task option, e.g. task.target_lang=Chinese."),
    ] = None,
    split: Annotated[str | None, typer.Option(help="With --data DIR: the split to evaluate, val or train.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per batch (default 8).")] = None,
    max_batches: Annotated[
        int | None, typer.Option(help="With --data DIR: evaluate at most this many batches (default 50; 0 = all).")
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="With --task: score only the first N examples.")] = None,
    suite: Annotated[
        Path | None,
        typer.Option(parser=storage.parse, help="Run the tasks of a suite TOML; --data DIR: its paths' root."),
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="choice: few-shot examples before each question (default 0).")
    ] = None,
    fewshot_seed: Annotated[
        int | None,
        typer.Option(help="choice: seed that draws few-shot examples (default 1234, as lm-eval; not MMLU layout)."),
    ] = None,
    fewshot_data: Annotated[
        Path | None,
        typer.Option(parser=storage.parse, help="choice: draw few-shot examples from this file, not from --data."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")] = False,
    quantize: Quantize = "",
    coordinator: Coordinator = "",
    num_processes: NumProcesses = 0,
    process_id: ProcessId = -1,
) -> None:
    """Validation loss and perplexity of a model, or task metrics with --task; written to metrics.json.

    Example: bigmodel evaluate runs/tiny --json; bigmodel evaluate runs/tiny --text test.txt;
    bigmodel evaluate runs/finetune-qa --task qa --data dev.json
    """
    import json

    _check_evaluate_options(locals())
    _setup_jax(coordinator, num_processes, process_id, inference=True)
    if suite is not None:  # several tasks, one table: bigmodel_cli/evaluate/suite.py
        from bigmodel_cli.evaluate import suite as suite_stage

        result = suite_stage.run(model, suite, data_root=data, out=out, quantize=quantize)
        suite_stage.render(result, json_out or _console().mode == "json")
        return
    if task == "preference":
        from bigmodel_cli.evaluate import preference

        metrics = preference.run(
            model,
            data,
            ref=ref,
            batch_size=batch_size or 8,
            max_examples=max_examples or 0,
            out=out,
            quantize=quantize,
        )
    elif task == "choice":
        from bigmodel_cli.evaluate import choice

        metrics = choice.run(
            model,
            data,
            fewshot_data=fewshot_data,
            num_fewshot=num_fewshot or 0,
            fewshot_seed=fewshot_seed,
            batch_size=batch_size or 8,
            max_examples=max_examples or 0,
            out=out,
            quantize=quantize,
            columns=columns,
        )
    elif task:
        from bigmodel_cli.evaluate import task_eval

        metrics = task_eval.run(
            task,
            data,
            model=model,
            data2=data2,
            predictions=predictions,
            out=out,
            overrides=overrides,
            columns=columns,
            metric=metric or "auto",
            batch_size=batch_size or 8,
            max_examples=max_examples or 0,
            quantize=quantize,
        )
    else:
        from bigmodel_cli.evaluate import lm as stage

        if text is not None:
            metrics = stage.run_text(model, text, batch_size=batch_size or 8, out=out, quantize=quantize)
        else:
            metrics = stage.run(
                model,
                data=data,
                split=split or "val",
                batch_size=batch_size or 8,
                max_batches=50 if max_batches is None else max_batches,
                out=out,
                quantize=quantize,
            )
    if json_out:
        print(json.dumps(metrics, ensure_ascii=False))
    else:
        _console().result(metrics)


# Options that belong to one mode of `evaluate`: given in another, they would do nothing, so they are refused.
_LM_ONLY = {"split": "--split", "max_batches": "--max-batches", "text": "--text"}
_TASK_ONLY = {
    "data2": "--data2",
    "predictions": "--predictions",
    "metric": "--metric",
    "columns": "--columns",
    "overrides": "--set",
    "max_examples": "--max-examples",
}
# Options of --task choice only, and the --task options that do not apply to it.
_CHOICE_ONLY = {"num_fewshot": "--num-fewshot", "fewshot_seed": "--fewshot-seed", "fewshot_data": "--fewshot-data"}
_NOT_CHOICE = {"data2": "--data2", "predictions": "--predictions", "metric": "--metric", "overrides": "--set"}

# --task preference scores pairs by log-likelihood: no predictions, metric choice, columns or task options.
_NOT_PREFERENCE = {**_NOT_CHOICE, "columns": "--columns"}

# With --suite each [[task]] sets these itself (--data is the root of its relative paths)
_NOT_SUITE = {"task": "--task", "batch_size": "--batch-size", "ref": "--ref", **_LM_ONLY, **_TASK_ONLY, **_CHOICE_ONLY}


def _check_evaluate_options(given: dict) -> None:
    """Refuse every option that would have no effect in the mode the others select, in one line."""
    if given["batch_size"] is not None and given["batch_size"] <= 0:
        raise UserError(f"--batch-size must be positive, got {given['batch_size']}")
    if given["max_batches"] is not None and given["max_batches"] < 0:
        raise UserError(f"--max-batches must be >= 0 (0 = all), got {given['max_batches']}")
    if given["max_examples"] is not None and given["max_examples"] <= 0:
        raise UserError(f"--max-examples must be positive, got {given['max_examples']}")
    if given["suite"] is not None:
        stray = [flag for name, flag in _NOT_SUITE.items() if given[name] not in (None, "")]
        if stray or given["model"] is None:
            raise UserError(f"{stray[0]} does nothing with --suite: remove it" if stray else "--suite needs a MODEL")
        return
    stray = [flag for name, flag in _CHOICE_ONLY.items() if given[name] is not None]
    if stray and given["task"] != "choice":
        raise UserError(f"{stray[0]} applies with --task choice only: add --task choice or remove it")
    if given["ref"] is not None and given["task"] != "preference":
        raise UserError("--ref applies with --task preference only: add --task preference or remove it")
    if given["task"] == "preference":
        stray = [flag for name, flag in _NOT_PREFERENCE.items() if given[name]]
        if stray:
            raise UserError(
                f"{stray[0]} does not apply to --task preference (it scores pairs by likelihood): remove it"
            )
        if given["model"] is None:
            raise UserError("--task preference scores a MODEL: pass a run directory, checkpoint, export or hf:DIR")
    if given["task"] == "choice":
        stray = [flag for name, flag in _NOT_CHOICE.items() if given[name]]
        if stray:
            raise UserError(f"{stray[0]} does not apply to --task choice (it scores choices by likelihood): remove it")
        if given["model"] is None:
            raise UserError("--task choice scores a MODEL: pass a run directory, checkpoint, export or hf:DIR")
    if given["task"]:
        stray = [flag for name, flag in _LM_ONLY.items() if given[name] is not None]
        if stray:
            raise UserError(f"{stray[0]} is for language-model evaluation, not --task: remove it")
        if given["data"] is None:
            raise UserError("--task needs --data FILE (the task's data)")
        for name, flag in (("batch_size", "--batch-size"), ("quantize", "--quantize")):
            if given["predictions"] is not None and given[name]:
                raise UserError(f"{flag} has no effect with --predictions (no model runs): remove it")
        return
    stray = [flag for name, flag in _TASK_ONLY.items() if given[name]]
    if stray:
        raise UserError(f"{stray[0]} applies with --task only: add --task or remove it")
    if given["model"] is None:
        raise UserError("pass the MODEL to evaluate (a run directory, checkpoint, export, hf:DIR or hf:ORG/NAME)")
    if given["text"] is not None:
        clash = [
            flag for name, flag in (("data", "--data"), *_LM_ONLY.items()) if name != "text" and given[name] is not None
        ]
        if clash:
            raise UserError(f"--text evaluates a whole file: {clash[0]} does not apply, remove it")
