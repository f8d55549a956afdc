"""`bigmodel finetune --task ...`: adapt a pretrained model to a task with the pretraining train step.

The prompt/target formats live in tasks/; this module starts from a model's weights (all of them
trainable, or frozen under LoRA adapters), builds loss-masked batches and hands them to the shared loop.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from bigmodel_cli import atomic, modelio, parallel, rundir, storage, tasks
from bigmodel_cli.config import (
    Config,
)
from bigmodel_cli.console import Console
from bigmodel_cli.data import loader
from bigmodel_cli.data.tokenizer import AnyTokenizer
from bigmodel_cli.errors import UserError
from bigmodel_cli.finetune_config import FinetuneConfig, FinetuneSection  # noqa: F401 (callers use finetune.*)
from bigmodel_cli.model import lora as lora_lib
from bigmodel_cli.model.params import LoadedModel, with_adapters
from bigmodel_cli.model.sizing import count_params
from bigmodel_cli.tasks import masks, taskinfo
from bigmodel_cli.tasks.options import TaskWarning
from bigmodel_cli.train import checkpoint, loop
from bigmodel_cli.train import preference as preference_lib

RECIPES = Path(__file__).parent / "recipes" / "finetune"


def default_recipe(task: str) -> Path:
    """The recipe shipped for a task (installed with the package)."""
    return RECIPES / f"{tasks.get(task).name}.toml"


class ExampleBatches:
    """Rows of encoded examples for a step: a seeded permutation of the examples, reshuffled each epoch,
    so that (like pretraining) a batch is a pure function of the step and resuming needs only the step."""

    def __init__(self, encoded: dict, batch_size: int, seed: int, rows: slice):
        self.arrays = {k: v for k, v in encoded.items() if k != "example_index"}  # what the train step reads
        self.count, self.batch_size, self.seed, self.rows = (
            len(next(iter(self.arrays.values()))),
            batch_size,
            seed,
            rows,
        )
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        flat = range(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]
        return np.array([self._order(k // self.count)[k % self.count] for k in flat], np.int64)

    def __call__(self, step: int) -> dict:
        rows = self.indices(step)
        return {k: v[rows] for k, v in self.arrays.items()}


def _examples(cfg: FinetuneConfig) -> tuple[list, list, dict]:
    ft = cfg.finetune
    kind, opts = tasks.get(ft.task), cfg.task
    path2 = storage.path(ft.train_file2) if ft.train_file2 else None
    train, info = kind.load(storage.path(ft.train_file), opts, path2=path2)
    if ft.val_file:
        val, _ = kind.load(storage.path(ft.val_file), opts, path2=storage.path(ft.val_file2) if ft.val_file2 else None)
    else:
        n_val = max(1, int(len(train) * ft.val_fraction))
        if len(train) < 2:
            raise UserError(f"{ft.train_file} has {len(train)} example(s): add data or pass --val-data")
        train, val = train[:-n_val], train[-n_val:]
    kind.check_labels(val, info.get("labels", []))
    return train, val, info


def resolve(cfg: FinetuneConfig, console: Console) -> tuple[Config, LoadedModel, AnyTokenizer]:
    """The starting model, its tokenizer, and the loop's config (model sizes come from the model)."""
    ft = cfg.finetune
    if not ft.task:
        raise UserError(f"no task: pass --task ({', '.join(tasks.NAMES)})")
    if not ft.init_from:
        raise UserError("no starting model: pass --init-from RUN_DIR|CHECKPOINT|EXPORT|hf:DIR|hf:ORG/NAME")
    if not ft.train_file:
        raise UserError("no training data: pass --data FILE")
    # The run's one mesh is base.mesh. A LoRA-finetuned start is folded: training (full or with new adapters)
    # starts from plain weights.
    base = modelio.plain(modelio.load(storage.path(ft.init_from), parallel.make_mesh(cfg.mesh)))
    tokenizer = base.tokenizer("finetuning needs the model's own tokenizer")
    seq_len = cfg.data.seq_len or base.model_cfg.max_seq_len
    if seq_len > base.model_cfg.max_seq_len:  # a task recipe's length on a shorter model: use what it has
        console.info(
            f"data.seq_len {seq_len} exceeds the model's {base.model_cfg.max_seq_len} positions: "
            f"using {base.model_cfg.max_seq_len}"
        )
        seq_len = base.model_cfg.max_seq_len
    loop_cfg = Config(
        model=base.model_cfg,
        data=dataclasses.replace(cfg.data, seq_len=seq_len, path=""),
        optim=cfg.optim,
        train=cfg.train,
        mesh=cfg.mesh,
        checkpoint=cfg.checkpoint,
    )
    return loop_cfg, base, tokenizer


def run(
    cfg: FinetuneConfig,
    run_dir: Path,
    *,
    resume: str = "auto",
    allow_config_change: bool = False,
    show_examples: int = 0,
    console: Console | None = None,
) -> dict:
    """Finetune per the config into run_dir (or, with show_examples, only print formatted examples)."""
    console = console or Console()
    loop_cfg, base, tokenizer = resolve(cfg, console)
    # Chats render with the template the starting model was finetuned with (an instruct run), else its own.
    tokenizer.chat_template = taskinfo.chat_template(taskinfo.read(base.home), tokenizer)
    seq_len = loop_cfg.data.seq_len
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TaskWarning)
        train, val, info = _examples(cfg)
        kind = tasks.get(cfg.finetune.task)
        ft = cfg.finetune
        encoded = kind.encode(train, tokenizer, seq_len, cfg.task, source=ft.train_file)
        val_source = ft.val_file or f"{ft.train_file} (validation share)"
        encoded_val = kind.encode(val, tokenizer, seq_len, cfg.task, source=val_source)
    for warning in caught:  # skipped or cut data: one line each, not a Python warning with source lines
        console.info(f"warning: {warning.message}")
    preference = cfg.finetune.task == "preference"
    if preference:  # the chosen side shows the layout; the rejected one differs only in its completion
        encoded_view = {k.removeprefix("chosen_"): v for k, v in encoded.items() if not k.startswith("rejected_")}
    else:
        masks.check_masks(encoded)
        encoded_view = encoded
    if show_examples:
        print(masks.show_examples(encoded_view, tokenizer, show_examples))
        return {}
    lora = cfg.lora if cfg.lora.rank else None

    def initial(mesh):
        if lora is None:
            return base.graphdef, base.params, None
        graphdef, adapters = lora_lib.init_adapters(with_adapters(base.model_cfg, lora), mesh, cfg.train.seed)
        return graphdef, adapters, base.params

    base_count, _ = count_params(base.model_cfg)
    trainable = lora_lib.trainable_count(with_adapters(base.model_cfg, lora)) if lora is not None else base_count
    total = base_count + (trainable if lora is not None else 0)

    def on_ready(run_dir: Path) -> None:  # the run directory is prepared: the stage's own files, then training
        if jax.process_index() == 0:
            base.tokenizer_files.copy_to(run_dir)  # tokenizer.model, or tokenizer.json and its config
            taskinfo.write(run_dir, kind, cfg.task, seq_len, info, tokenizer, cfg.preference if preference else None)
            atomic.write_json(run_dir / rundir.MODEL_FILE, dataclasses.asdict(base.model_cfg))
        console.info(
            f"finetune --task {cfg.finetune.task}: {len(encoded['example_index'])} training and "
            f"{len(encoded_val['example_index'])} validation examples; trainable parameters {trainable:,} of "
            f"{total:,} ({100 * trainable / total:.2f}%)"
        )

    rows = parallel.process_rows(loop_cfg.train.batch_size, base.mesh)
    batch_size = loop_cfg.train.batch_size
    # A LoRA run reopens its base by path on every resume, and preference tuning its reference: their weights must
    # be the ones the run started from (init_from may be a run that trained on since, or a moved Hub branch).
    reopened = lora is not None or (preference and cfg.preference.needs_reference)
    fingerprints = {"base": checkpoint.digest(base.params)} if reopened else {}

    def open_batches() -> loop.Batches:
        if not preference:
            val = encoded_val
            return loop.Batches(
                ExampleBatches(encoded, batch_size, loop_cfg.train.seed, rows),
                lambda: loader.array_batches(val, batch_size, loop_cfg.train.eval_batches, rows),
            )
        # The reference's log-probabilities, once for all pairs (see train/preference.py for why not per step):
        # the starting weights before any update; with LoRA that is the base, whose graph has no adapters.
        started = time.perf_counter()
        train_pairs, val_pairs = (
            preference_lib.with_reference(pairs, base.graphdef, base.params, batch_size, base.mesh, cfg.preference)
            for pairs in (encoded, encoded_val)
        )
        if cfg.preference.needs_reference:
            pairs = len(encoded["example_index"]) + len(encoded_val["example_index"])
            console.info(f"reference log-probabilities of {pairs} pairs: {time.perf_counter() - started:.1f}s")
        val_rows = {
            k: v[: batch_size * loop_cfg.train.eval_batches] for k, v in val_pairs.items() if k != "example_index"
        }
        return loop.Batches(
            ExampleBatches(train_pairs, batch_size, loop_cfg.train.seed, rows),
            lambda: ({k: v[rows] for k, v in b.items()} for b in preference_lib.padded_pairs(val_rows, batch_size)),
        )

    inputs = loop.LoopInputs(
        cfg=loop_cfg,
        mesh=base.mesh,
        run_dir=run_dir,
        open_batches=open_batches,
        seq_len=seq_len,
        meta={"stage": "finetune", "task": cfg.finetune.task, "fingerprints": fingerprints},
        console=console,
        initial=initial,
        dropout_seed=loop_cfg.train.seed if lora is not None and lora.dropout > 0 else None,
        **({"loss": preference_lib.loss_fn(cfg.preference)} if preference else {}),
    )
    result = loop.run(
        inputs, resume=resume, allow_config_change=allow_config_change, recorded_cfg=cfg, on_ready=on_ready
    )
    return {**result, "trainable_params": trainable}
