"""The `bigmodel` command: each subcommand parses its arguments and calls one stage's run().

Shared options and the error/exit-code wrapper are in cli_app.py; `evaluate` is in cli_evaluate.py and the
commands that inspect recipes and runs in cli_runs.py. They are registered here, in the order `--help` lists.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from bigmodel_cli import cli_evaluate, cli_runs, host, storage
from bigmodel_cli.cli_app import (
    MODEL_SOURCES,
    AllowConfigChange,
    Coordinator,
    Data2,
    NumProcesses,
    Overrides,
    ProcessId,
    ProfileSteps,
    Quantize,
    Resume,
    _console,
    _options,
    _setup_jax,
    app,
    command,
    profile_values,
)
from bigmodel_cli.errors import UserError


@command
def preprocess(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Files (.txt .jsonl .json .csv .tsv .parquet; text kinds may end in .gz .zst .bz2 .xz), "
            "directories, quoted glob patterns, or hf:NAME[:CONFIG][@SPLIT] Hugging Face datasets."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", parser=storage.parse, help="Output directory (must not exist or be empty).")
    ],
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size (char sizes itself).")] = 8000,
    model_type: Annotated[str, typer.Option(help="Tokenizer kind: bpe, unigram or char.")] = "bpe",
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Use this tokenizer instead of training one: a SentencePiece .model, a tokenizer.json, or a model "
            "directory (run, export, hf:DIR) holding one."
        ),
    ] = None,
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
    run_dir: Annotated[
        Path | None, typer.Option(parser=storage.parse, help="Where checkpoints and logs go (default runs/<recipe>).")
    ] = None,
    overrides: Overrides = None,
    resume: Resume = "auto",
    allow_config_change: AllowConfigChange = False,
    profile_steps: ProfileSteps = "",
    coordinator: Coordinator = "",
    num_processes: NumProcesses = 0,
    process_id: ProcessId = -1,
) -> None:
    """Train a model from scratch on preprocessed tokens; reruns resume from the last checkpoint.

    Example: bigmodel pretrain recipes/tiny.toml --run-dir runs/tiny --set train.steps=100
    """
    from bigmodel_cli import config

    # Checked before the stage is imported: JAX and the rest of the stack take a second to load.
    cfg = config.load_config(recipe, overrides or [], values=profile_values(profile_steps))
    from bigmodel_cli import pretrain as stage

    _setup_jax(coordinator, num_processes, process_id)
    console = _console()
    run_dir = run_dir or Path("runs") / recipe.stem
    result = stage.run(cfg, run_dir, resume=resume, allow_config_change=allow_config_change, console=console)
    console.result({"run_dir": str(run_dir), **{k: v for k, v in result.items() if k in ("step", "loss", "val_loss")}})


@command
def finetune(
    recipe: Annotated[Path | None, typer.Argument(help="A finetuning recipe (default: the task's own).")] = None,
    task: Annotated[str, typer.Option(help="qa, classify, summarize, translate, instruct or preference.")] = "",
    init_from: Annotated[str, typer.Option(help=f"Starting model: {MODEL_SOURCES}.")] = "",
    data: Annotated[Path | None, typer.Option(parser=storage.parse, help="Task data to train on.")] = None,
    data2: Data2 = None,
    val_data: Annotated[
        Path | None, typer.Option(parser=storage.parse, help="Held-out task data (default: 10% of --data).")
    ] = None,
    val_data2: Annotated[
        Path | None, typer.Option(parser=storage.parse, help="translate: target-language file for --val-data.")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="CSV/TSV without a header row: its column names, e.g. label,title,text.")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(parser=storage.parse, help="Where checkpoints and logs go (default runs/finetune-<task>)."),
    ] = None,
    overrides: Overrides = None,
    show_examples: Annotated[
        int, typer.Option(help="Print N formatted examples, trained-on tokens marked, and exit.")
    ] = 0,
    resume: Resume = "auto",
    allow_config_change: AllowConfigChange = False,
    profile_steps: ProfileSteps = "",
    coordinator: Coordinator = "",
    num_processes: NumProcesses = 0,
    process_id: ProcessId = -1,
) -> None:
    """Adapt a pretrained model to a task; loss only on target tokens, LoRA with --set lora.rank=8.

    Example: bigmodel finetune --task qa --init-from runs/tiny --data train.json --val-data dev.json
    """
    from bigmodel_cli import config
    from bigmodel_cli import finetune as stage

    flags = {
        "task": task,
        "init_from": init_from,
        "train_file": data,
        "train_file2": data2,
        "val_file": val_data,
        "val_file2": val_data2,
    }
    values = {"finetune": {key: value for key, value in flags.items() if value}, **profile_values(profile_steps)}
    if columns is not None:
        values["task"] = {"columns": columns}
    if recipe is None:
        if not task:
            raise UserError("pass --task (qa, classify, summarize, translate, instruct, preference) or a recipe")
        recipe = stage.default_recipe(task)
    cfg = config.load_config(recipe, overrides or [], cls=stage.FinetuneConfig, values=values)
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


evaluate = command(cli_evaluate.evaluate)


@command
def generate(
    model: Annotated[Path, typer.Argument(parser=storage.parse, help=f"The model: {MODEL_SOURCES}.")],
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
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Chat in the model's chat template: reply to each line of stdin (until an empty line or /exit), "
            "or with --prompt to that one message.",
        ),
    ] = False,
    quantize: Quantize = "",
) -> None:
    """Continue a prompt with a trained model (KV-cache decoding); an instruct model replies to it as a chat.

    Example: bigmodel generate runs/tiny --prompt "ROMEO:" --max-new-tokens 200 --top-p 0.9
    """
    from bigmodel_cli.evaluate import generate as stage

    if chat and raw:
        raise UserError("--raw continues plain text and --chat holds a conversation: pass one of them")
    import json

    as_json = _options["log_format"] == "json"  # one object per line, as every command prints for scripts
    _setup_jax(inference=True)
    if chat:
        sampling = stage.Sampling(max_new_tokens, temperature, top_k, top_p, seed)
        messages = [prompt] if prompt else stage.terminal_lines()

        def on_reply(reply: str) -> None:
            print(json.dumps({"reply": reply}, ensure_ascii=False) if as_json else reply, flush=True)

        stage.chat(model, messages, on_reply, sampling, tuple(stop or ()), quantize)
        return
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
        quantize=quantize,
    )
    print(json.dumps({"text": text}, ensure_ascii=False) if as_json else text)


@command
def serve(
    model: Annotated[Path, typer.Argument(parser=storage.parse, help=f"The model: {MODEL_SOURCES}.")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one (printed).")] = 8000,
    api_key: Annotated[
        str, typer.Option(envvar="BIGMODEL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests.")
    ] = "",
    max_batch: Annotated[int, typer.Option(help="Requests decoded together (KV-cache slots).")] = 8,
    max_model_len: Annotated[
        int,
        typer.Option(help="Prompt + answer tokens per request (the KV cache's length); 0 = the model's, at most 4096."),
    ] = 0,
    served_model_name: Annotated[str, typer.Option(help="The model id clients pass; default: MODEL as given.")] = "",
    quantize: Quantize = "",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions), batching requests.

    Example: bigmodel serve runs/tiny --port 8000 --api-key secret
    """
    from bigmodel_cli import serve as stage

    _setup_jax(inference=True)
    stage.run(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_model_len=max_model_len,
        name=served_model_name,
        quantize=quantize,
    )


@command
def tokenize(
    source: Annotated[
        Path,
        typer.Argument(
            parser=storage.parse,
            help="A run directory, a checkpoint, an export, hf:DIR, a tokenizer.json or a SentencePiece .model file.",
        ),
    ],
    text: Annotated[str, typer.Option(help="The text to tokenize, as a prompt.")],
    json_out: Annotated[
        bool, typer.Option("--json", help='Print {"ids": [...], "tokens": [...]} as one object.')
    ] = False,
) -> None:
    """Show the token ids and pieces a model sees for a prompt (BOS where transformers adds one); no weights load.

    Example: bigmodel tokenize hf:models/llama --text "Hello world" --json
    """
    import json

    from bigmodel_cli.evaluate import tokenize as stage

    result = stage.run(source, text)
    if json_out or _options["log_format"] == "json":
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"ids:    {json.dumps(result['ids'])}")
        print(f"tokens: {json.dumps(result['tokens'], ensure_ascii=False)}")


@command
def inspect(
    model: Annotated[Path, typer.Argument(parser=storage.parse, help=f"The model: {MODEL_SOURCES}.")],
    prompt: Annotated[str, typer.Option(help="The text to look at, tokenized as a prompt.")],
    out: Annotated[Path, typer.Option(parser=storage.parse, help="A new directory for the maps and the lens.")],
    top_k: Annotated[int, typer.Option(help="Logit lens: candidates per layer and position.")] = 5,
) -> None:
    """Show what a model looks at: every layer's and head's attention over the prompt (PNG grid, HTML page,
    attention.npz) and the logit lens, each layer's likeliest next tokens (logit_lens.json).

    Example: bigmodel inspect runs/tiny --prompt "ROMEO: But soft" --out inspect/romeo
    """
    from bigmodel_cli.evaluate import inspect as stage

    _setup_jax(inference=True)
    _console().result({what: str(path) for what, path in stage.run(model, prompt, out, top_k=top_k).items()})


@command
def export(
    model: Annotated[Path, typer.Argument(parser=storage.parse, help=f"The model: {MODEL_SOURCES}.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            parser=storage.parse,
            help="New directory for the export (must not exist or be empty); --format gguf: a new file.",
        ),
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="bigmodel, hf (transformers), stablehlo or gguf (llama.cpp, Ollama).")
    ] = "bigmodel",
    dtype: Annotated[str, typer.Option(help="Weights as float32 or bfloat16 (default: as stored).")] = "",
    max_shard_bytes: Annotated[
        int | None, typer.Option(help="--format hf: split the weights into files of at most this size (default 5e9).")
    ] = None,
    quant: Annotated[str, typer.Option(help="--format gguf: weights as f16 (default), bf16, q8_0 or q4_0.")] = "",
) -> None:
    """Write a self-contained model: bigmodel's own directory, a Hugging Face one (the model's family), StableHLO,
    or one GGUF file for llama.cpp and Ollama.

    Example: bigmodel export runs/tiny --format hf --out exports/tiny-hf
    Example: bigmodel export runs/tiny --format gguf --quant q8_0 --out tiny-q8_0.gguf
    """
    from bigmodel_cli import export as stage

    _setup_jax()
    path = stage.run(model, out, fmt, dtype or None, max_shard_bytes, quant or None)
    _console().result({"out": str(path)})


@command
def quickstart(
    out: Annotated[Path, typer.Option("--out", help="Directory for the data, run and export.")] = Path(
        "bigmodel-quickstart"
    ),
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
) -> None:
    """Preprocess a built-in corpus, pretrain a small model, evaluate it and generate text (a minute on 2 CPU cores).

    Example: bigmodel quickstart --out /tmp/qs
    """
    from bigmodel_cli import quickstart as stage

    _setup_jax()
    stage.run(out, steps=steps, console=_console())


plan = command(cli_runs.plan)
report = command(cli_runs.report)
runs = command(cli_runs.runs)


def main() -> None:
    """Console entry point: `bigmodel ...`."""
    # Read when JAX starts its CPU backend; inherited by the re-exec below.
    os.environ["XLA_FLAGS"] = host.cli_xla_flags(os.environ.get("XLA_FLAGS", ""))
    tunables = host.wants_malloc_tunables(sys.argv[1:])
    if tunables and "GLIBC_TUNABLES" not in os.environ and not os.environ.get("BIGMODEL_NO_REEXEC"):
        env = {**os.environ, "GLIBC_TUNABLES": host.CPU_MALLOC_TUNABLES, "BIGMODEL_NO_REEXEC": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "bigmodel_cli", *sys.argv[1:]], env)
    try:
        app(prog_name="bigmodel")
    finally:
        # The command is over and has closed what it wrote. The interpreter's last garbage collection walks
        # every object JAX, flax and the rest made (0.4 s of a 0.6 s exit after a training run); frozen, it
        # skips them, and the modules are still torn down as usual.
        gc.freeze()
