"""The `bigmodel` command: each subcommand parses its arguments and calls one stage's run()."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from bigmodel_cli import __version__, rundir
from bigmodel_cli.errors import UserError

app = typer.Typer(
    name="bigmodel",
    help="Raw text to a pretrained, evaluated and exported Llama-style Transformer.\n\nExample: bigmodel quickstart",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_options = {"debug": False, "log_format": "rich", "quiet": False}

Coordinator = Annotated[str, typer.Option(help="Multi-process run: HOST:PORT of process 0 (or BIGMODEL_COORDINATOR).")]
NumProcesses = Annotated[int, typer.Option(help="Multi-process run: how many processes (or BIGMODEL_NUM_PROCESSES).")]
ProcessId = Annotated[int, typer.Option(help="Multi-process run: this process's index (or BIGMODEL_PROCESS_ID).")]

Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key, e.g. --set optim.lr=1e-3 (repeatable).")
]


def _version(value: bool) -> None:
    if value:
        print(f"bigmodel {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only final results.")] = False,
    log_format: Annotated[
        str, typer.Option("--log-format", help="rich (default) or json: one object per line.")
    ] = "rich",
) -> None:
    """Raw text to a pretrained, evaluated and exported Llama-style Transformer."""
    _options.update(debug=debug, quiet=quiet, log_format=log_format)
    from bigmodel_cli.console import set_track_mode

    set_track_mode("quiet" if quiet else log_format)


def _console():
    from bigmodel_cli.console import Console

    if _options["log_format"] not in ("rich", "json"):
        raise UserError(f"--log-format must be rich or json, got {_options['log_format']!r}")
    return Console("quiet" if _options["quiet"] else _options["log_format"])


def _setup_jax(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    from bigmodel_cli import parallel, utils

    utils.enable_compilation_cache()
    parallel.init_distributed(coordinator, num_processes, process_id)


def command(fn):
    """Register a subcommand whose end is one line and an exit code: 0 done, 2 a UserError, 1 an internal or
    I/O error, 128 + the signal when stopped (130 SIGINT, 143 SIGTERM); the table is in rundir."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ended = ("failed", "")  # how to mark a run directory that the command still holds when it ends
        previous = _stop_on_sigterm()
        try:
            result = fn(*args, **kwargs)
            ended = ("", "")
            return result
        except UserError as err:
            ended = ("failed", str(err))
            if _options["debug"]:
                raise
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:  # Ctrl-C, or rundir.Stopped: a signal stopped a run (getattr: either)
            ended = ("stopped", "")
            print(getattr(err, "message", "interrupted"), file=sys.stderr)
            raise typer.Exit(getattr(err, "exit_code", 130)) from None
        except OSError as err:
            if _options["debug"]:
                raise
            where = f" {err.filename}" if err.filename else ""
            print(f"error:{where}: {err.strerror or err} (check the path and free disk space)", file=sys.stderr)
            raise typer.Exit(1) from None
        except Exception as err:  # a bug, not bad input: say so, and how to see the traceback
            if _options["debug"]:
                raise
            print(
                f"error: internal error {type(err).__name__}: {err} (rerun with --debug for details)", file=sys.stderr
            )
            raise typer.Exit(1) from None
        finally:
            rundir.release_all(*ended)
            if previous is not None:  # None as the old handler: one set outside Python, i.e. the default
                signal.signal(signal.SIGTERM, previous[0] if previous[0] is not None else signal.SIG_DFL)

    return app.command()(wrapper)


def _stop_on_sigterm() -> tuple | None:
    """Make SIGTERM raise rundir.Stopped (exit 143, a true status.json) rather than kill the process mid-write;
    returns (the previous handler,) to restore, or None off the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return (signal.signal(signal.SIGTERM, rundir.raise_stopped),)


@command
def preprocess(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Files (.txt .jsonl .json .csv .tsv .parquet; text kinds may end in .gz .zst .bz2 .xz), "
            "directories, quoted glob patterns, or hf:NAME[:CONFIG][@SPLIT] Hugging Face datasets."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory (must not exist or be empty).")],
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size (char sizes itself).")] = 8000,
    model_type: Annotated[str, typer.Option(help="Tokenizer kind: bpe, unigram or char.")] = "bpe",
    tokenizer: Annotated[Path | None, typer.Option(help="Use this SentencePiece .model instead of training.")] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Share of documents held out for validation: 0 = none, 1 = all (a test file).")
    ] = 0.1,
    text_field: Annotated[
        str, typer.Option(help="Record field(s) with the text: a.b for nested ones, title,body to join several.")
    ] = "text",
    txt_mode: Annotated[
        str, typer.Option(help="A .txt file is one document (file), one per line (line), or per paragraph.")
    ] = "file",
    byte_fallback: Annotated[
        bool | None,
        typer.Option(
            "--byte-fallback/--no-byte-fallback",
            help="Characters outside the vocabulary as UTF-8 bytes, so any text round-trips (default: on).",
        ),
    ] = None,
    character_coverage: Annotated[
        float, typer.Option(help="Share of characters the vocabulary covers; 0 = 0.9995 (1.0 for char).")
    ] = 0.0,
    max_sentences: Annotated[int, typer.Option(help="Train the tokenizer on at most this many sampled lines.")] = (
        1_000_000
    ),
    special_tokens: Annotated[
        str, typer.Option(help="Comma-separated strings that always become one token, e.g. '<|user|>,<|end|>'.")
    ] = "",
    pack_documents: Annotated[
        bool, typer.Option(help="Store document boundaries: batches then carry segment_ids and positions.")
    ] = False,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per output file.")] = 100_000_000,
    workers: Annotated[int, typer.Option(help="Encoding processes; 0 = one per CPU core.")] = 0,
) -> None:
    """Tokenize text into sharded train/val token files plus manifest.json, in constant memory.

    Example: bigmodel preprocess corpus.txt --out data/corpus --model-type char
    """
    from bigmodel_cli.data import preprocess as stage

    cfg = stage.PreprocessConfig(
        inputs=tuple(inputs),
        out=out,
        vocab_size=vocab_size,
        model_type=model_type,
        tokenizer=tokenizer,
        val_fraction=val_fraction,
        text_field=text_field,
        txt_mode=txt_mode,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        max_sentences=max_sentences,
        special_tokens=tuple(t for t in special_tokens.split(",") if t),
        pack_documents=pack_documents,
        shard_tokens=shard_tokens,
        workers=workers,
    )
    manifest = stage.run(cfg, console=_console())
    splits = manifest["splits"]
    _console().result(
        {
            "out": str(out),
            "documents": manifest["documents"],
            "vocab_size": manifest["tokenizer"]["vocab_size"],
            "train_tokens": splits["train"]["tokens"],
            "val_tokens": splits["val"]["tokens"],
            "files": sum(len(s["files"]) for s in splits.values()),
            "unigram_entropy": round(manifest["unigram_entropy"], 4),
        }
    )


@command
def pretrain(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe, e.g. recipes/tiny.toml.")],
    run_dir: Annotated[Path | None, typer.Option(help="Where checkpoints and logs go (default runs/<recipe>).")] = None,
    overrides: Overrides = None,
    resume: Annotated[str, typer.Option(help="auto: continue if checkpoints exist; never; must.")] = "auto",
    allow_config_change: Annotated[bool, typer.Option(help="Resume even though the recipe changed.")] = False,
    coordinator: Coordinator = "",
    num_processes: NumProcesses = 0,
    process_id: ProcessId = -1,
) -> None:
    """Train a model from scratch on preprocessed tokens; reruns resume from the last checkpoint.

    Example: bigmodel pretrain recipes/tiny.toml --run-dir runs/tiny --set train.steps=100
    """
    from bigmodel_cli import config
    from bigmodel_cli import pretrain as stage

    cfg = config.load_config(recipe, overrides or [])
    _setup_jax(coordinator, num_processes, process_id)
    console = _console()
    run_dir = run_dir or Path("runs") / recipe.stem
    result = stage.run(cfg, run_dir, resume=resume, allow_config_change=allow_config_change, console=console)
    console.result({"run_dir": str(run_dir), **{k: v for k, v in result.items() if k in ("step", "loss", "val_loss")}})


@command
def finetune(
    recipe: Annotated[Path | None, typer.Argument(help="A finetuning recipe (default: the task's own).")] = None,
    task: Annotated[str, typer.Option(help="qa, classify, summarize, translate or instruct.")] = "",
    init_from: Annotated[str, typer.Option(help="Starting model: run dir, checkpoint, export or hf:DIR.")] = "",
    data: Annotated[Path | None, typer.Option(help="Task data to train on.")] = None,
    data2: Annotated[Path | None, typer.Option(help="translate: target-language file aligned with --data.")] = None,
    val_data: Annotated[Path | None, typer.Option(help="Held-out task data (default: 10% of --data).")] = None,
    val_data2: Annotated[Path | None, typer.Option(help="translate: target-language file for --val-data.")] = None,
    columns: Annotated[
        str | None, typer.Option(help="CSV/TSV without a header row: its column names, e.g. label,title,text.")
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where checkpoints and logs go (default runs/<task>).")] = None,
    overrides: Overrides = None,
    show_examples: Annotated[
        int, typer.Option(help="Print N formatted examples, trained-on tokens marked, and exit.")
    ] = 0,
    resume: Annotated[str, typer.Option(help="auto: continue if checkpoints exist; never; must.")] = "auto",
    allow_config_change: Annotated[bool, typer.Option(help="Resume even though the recipe changed.")] = False,
    coordinator: Coordinator = "",
    num_processes: NumProcesses = 0,
    process_id: ProcessId = -1,
) -> None:
    """Adapt a pretrained model to a task; loss only on target tokens, LoRA with --set lora.rank=8.

    Example: bigmodel finetune --task qa --init-from runs/tiny --data train.json --val-data dev.json
    """
    from bigmodel_cli import config
    from bigmodel_cli import finetune as stage

    given = {
        "task": task,
        "init_from": init_from,
        "train_file": data,
        "train_file2": data2,
        "val_file": val_data,
        "val_file2": val_data2,
    }
    cli_sets = [f"finetune.{key}={value}" for key, value in given.items() if value]
    if columns is not None:
        cli_sets.append(f"task.columns={columns}")
    if recipe is None:
        if not task:
            raise UserError("pass --task (qa, classify, summarize, translate, instruct) or a recipe")
        recipe = stage.default_recipe(task)
    cfg = config.load_config(recipe, [*cli_sets, *(overrides or [])], cls=stage.FinetuneConfig)
    _setup_jax(coordinator, num_processes, process_id)
    console = _console()
    run_dir = run_dir or Path("runs") / f"finetune-{cfg.finetune.task}"
    result = stage.run(
        cfg,
        run_dir,
        resume=resume,
        allow_config_change=allow_config_change,
        show_examples=show_examples,
        console=console,
    )
    if result:
        console.result(
            {
                "run_dir": str(run_dir),
                "trainable_params": result["trainable_params"],
                **{k: v for k, v in result.items() if k in ("step", "loss", "val_loss")},
            }
        )


@command
def evaluate(
    model: Annotated[
        Path | None, typer.Argument(help="A run directory, one of its checkpoints, an export or hf:DIR.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Preprocessed data directory, or with --task a task file.")] = None,
    text: Annotated[
        Path | None, typer.Option(help="Perplexity and bits per byte of this whole raw text file (UTF-8, or .gz).")
    ] = None,
    task: Annotated[str, typer.Option(help="Score a task: qa, classify, summarize, translate or instruct.")] = "",
    data2: Annotated[Path | None, typer.Option(help="translate: target-language file aligned with --data.")] = None,
    predictions: Annotated[Path | None, typer.Option(help="Score this predictions file instead of generating.")] = None,
    metric: Annotated[
        str | None, typer.Option(help="qa: squad or cmrc2018 (default: cmrc2018 for Chinese data, else squad).")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="CSV/TSV without a header row: its column names, e.g. label,title,text.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where metrics.json (and predictions.jsonl) go.")] = None,
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
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")] = False,
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
    _setup_jax(coordinator, num_processes, process_id)
    if task:
        from bigmodel_cli.evaluate import task_eval

        if columns is not None:
            overrides = [*(overrides or []), f"task.columns={columns}"]
        metrics = task_eval.run(
            task,
            data,
            model=model,
            data2=data2,
            predictions=predictions,
            out=out,
            overrides=overrides,
            metric=metric or "auto",
            batch_size=batch_size or 8,
            max_examples=max_examples or 0,
        )
    else:
        from bigmodel_cli.evaluate import lm as stage

        if text is not None:
            metrics = stage.run_text(model, text, batch_size=batch_size or 8, out=out)
        else:
            metrics = stage.run(
                model,
                data=data,
                split=split or "val",
                batch_size=batch_size or 8,
                max_batches=50 if max_batches is None else max_batches,
                out=out,
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


def _check_evaluate_options(given: dict) -> None:
    """Refuse every option that would have no effect in the mode the others select, in one line."""
    if given["batch_size"] is not None and given["batch_size"] <= 0:
        raise UserError(f"--batch-size must be positive, got {given['batch_size']}")
    if given["max_batches"] is not None and given["max_batches"] < 0:
        raise UserError(f"--max-batches must be >= 0 (0 = all), got {given['max_batches']}")
    if given["max_examples"] is not None and given["max_examples"] <= 0:
        raise UserError(f"--max-examples must be positive, got {given['max_examples']}")
    if given["task"]:
        stray = [flag for name, flag in _LM_ONLY.items() if given[name] is not None]
        if stray:
            raise UserError(f"{stray[0]} is for language-model evaluation, not --task: remove it")
        if given["data"] is None:
            raise UserError("--task needs --data FILE (the task's data)")
        if given["predictions"] is not None and given["batch_size"] is not None:
            raise UserError("--batch-size has no effect with --predictions (no model runs): remove it")
        return
    stray = [flag for name, flag in _TASK_ONLY.items() if given[name]]
    if stray:
        raise UserError(f"{stray[0]} applies with --task only: add --task or remove it")
    if given["model"] is None:
        raise UserError("pass the MODEL to evaluate (a run directory, checkpoint, export or hf:DIR)")
    if given["text"] is not None:
        clash = [
            flag for name, flag in (("data", "--data"), *_LM_ONLY.items()) if name != "text" and given[name] is not None
        ]
        if clash:
            raise UserError(f"--text evaluates a whole file: {clash[0]} does not apply, remove it")


@command
def generate(
    model: Annotated[Path, typer.Argument(help="A run directory, one of its checkpoints, an export or hf:DIR.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="How many tokens to add.")] = 100,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens; 0 = all.")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample from the smallest set of tokens reaching probability p.")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same text.")] = 0,
    raw: Annotated[
        bool, typer.Option("--raw", help="Instruct models: continue the prompt as plain text, not as a chat turn.")
    ] = False,
) -> None:
    """Continue a prompt with a trained model (KV-cache decoding); an instruct model replies to it as a chat.

    Example: bigmodel generate runs/tiny --prompt "ROMEO:" --max-new-tokens 200 --top-p 0.9
    """
    from bigmodel_cli.evaluate import generate as stage

    _setup_jax()
    text = stage.run(
        model,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop or ()),
        raw=raw,
    )
    print(text)


@command
def export(
    model: Annotated[Path, typer.Argument(help="A run directory, a checkpoint, an export, or hf:DIR.")],
    out: Annotated[Path, typer.Option("--out", help="New directory for the export (must not exist or be empty).")],
    fmt: Annotated[str, typer.Option("--format", help="bigmodel, hf (transformers Llama) or stablehlo.")] = "bigmodel",
    dtype: Annotated[str, typer.Option(help="Weights as float32 or bfloat16 (default: as stored).")] = "",
    max_shard_bytes: Annotated[
        int | None, typer.Option(help="--format hf: split the weights into files of at most this size (default 5e9).")
    ] = None,
) -> None:
    """Write a self-contained model directory: bigmodel's own, a Hugging Face Llama directory, or StableHLO.

    Example: bigmodel export runs/tiny --format hf --out exports/tiny-hf
    """
    from bigmodel_cli import export as stage

    _setup_jax()
    path = stage.run(model, out, fmt, dtype or None, max_shard_bytes)
    _console().result({"out": str(path)})


@command
def quickstart(
    out: Annotated[Path, typer.Option("--out", help="Directory for the data, run and export.")] = Path(
        "bigmodel-quickstart"
    ),
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
) -> None:
    """Preprocess a built-in corpus, pretrain a small model, evaluate it and generate text (a few minutes on CPU).

    Example: bigmodel quickstart --out /tmp/qs
    """
    from bigmodel_cli import quickstart as stage

    _setup_jax()
    stage.run(out, steps=steps, console=_console())


@command
def plan(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    overrides: Overrides = None,
    devices: Annotated[int, typer.Option(help="Plan for N devices (on CPU: N fake devices).")] = 0,
    memory_budget_gb: Annotated[float, typer.Option(help="Refuse a recipe needing more GiB per device.")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
) -> None:
    """Compile the train step for a recipe's mesh without training: sizes, memory per device, FLOPs, shardings.

    Example: bigmodel plan recipes/base.toml --devices 8 --memory-budget-gb 16
    """
    import json

    if devices and "jax" not in sys.modules:  # fake CPU devices must be requested before jax starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    import jax

    from bigmodel_cli import config
    from bigmodel_cli import plan as stage

    if devices and jax.device_count() != devices:
        raise UserError(f"--devices {devices}: this process already has {jax.device_count()} devices")
    cfg = config.load_config(recipe, overrides or [])
    _setup_jax()
    result = stage.run(cfg, memory_budget_gb)
    if json_out:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if result["note"]:
        out.print(f"note: {result['note']}")
    gib = {k: f"{v / 2**30:.3f} GiB" for k, v in result["bytes_per_device"].items()}
    out.print(f"parameters: {result['params']:,} | mesh {result['mesh']} on {result['devices']} devices")
    out.print(
        f"per device: params {gib['params']}, optimizer {gib['optimizer']}, "
        f"activations+temporaries {gib['activations_and_temporaries']}, total {gib['total']}"
    )
    out.print(
        f"FLOPs per step: model {result['model_flops_per_step']:.3e} "
        f"(XLA, per device: {result['xla_flops_per_step_per_device']:.3e}), "
        f"{result['tokens_per_step']:,} tokens per step"
    )
    table = Table("parameter", "shape", "dtype", "sharding")
    for row in result["parameters"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), row["dtype"], row["sharding"])
    out.print(table)


@command
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run directories to compare.")],
    out: Annotated[Path, typer.Option("--out", help="report.png or report.html")] = Path("report.png"),
) -> None:
    """Plot loss, validation loss, learning rate and throughput of runs, with their final metrics.

    Example: bigmodel report runs/a runs/b --out report.html
    """
    from bigmodel_cli import report as stage

    path = stage.run(list(run_dirs), out)
    _console().result({"out": str(path)})


@command
def runs(root: Annotated[Path, typer.Argument(help="Directory holding run directories.")] = Path("runs")) -> None:
    """List runs under a directory with their step, last loss and status.

    Example: bigmodel runs runs/
    """
    import json

    from bigmodel_cli.report import list_runs

    found = list_runs(root)
    if _options["log_format"] == "json":
        for row in found:
            print(json.dumps({k: (str(v) if k == "path" else v) for k, v in row.items()}))
        return
    if not found:
        print(f"no runs under {root}")
        return
    width = max(len(str(r["path"])) for r in found)
    print(f"{'run':<{width}}  {'step':>7}  {'loss':>8}  {'val_loss':>8}  status")
    for r in found:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(
            f"{str(r['path']):<{width}}  {r['step'] if r['step'] is not None else '-':>7}  {loss:>8}  {val:>8}  "
            f"{r['status']}"
        )


# XLA:CPU allocates its scratch buffers afresh every step and glibc serves them from new mmap pages: about
# a million page faults per step on the 35M config. Keeping freed memory in the heap removes them (it must
# be set before the process starts, hence the re-exec). Accelerator hosts keep glibc's defaults.
CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1"


def _cpu_only_host() -> bool:
    accelerators = ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return (platforms == "cpu" or not any(os.path.exists(p) for p in accelerators)) and sys.platform == "linux"


def main() -> None:
    """Console entry point: `bigmodel ...`."""
    if _cpu_only_host() and "GLIBC_TUNABLES" not in os.environ and not os.environ.get("BIGMODEL_NO_REEXEC"):
        env = {**os.environ, "GLIBC_TUNABLES": CPU_MALLOC_TUNABLES, "BIGMODEL_NO_REEXEC": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "bigmodel_cli", *sys.argv[1:]], env)
    app(prog_name="bigmodel")
