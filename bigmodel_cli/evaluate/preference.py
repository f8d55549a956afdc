"""`bigmodel evaluate MODEL --task preference --data pairs.jsonl [--ref MODEL]`: how a model ranks preference pairs.

Two views, as DPO users read them:
- the implicit reward beta * log(pi / pi_ref) of each completion against a reference (`--ref`; by default the
  model a preference run started from, which its config.toml records): reward accuracy (chosen rewarded above
  rejected) and the mean margin between the two, the numbers TRL logs as rewards/accuracies and rewards/margins;
- the win rate of chosen over rejected by the model's own log-likelihood, which needs no reference, so that an
  SFT model and a DPO model compare on one scale.
A tie (the same score for both, as for any model against itself) counts as half a win, the coin flip it is: a
model scored against its own reference gets 0.5, not 0.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from bigmodel_cli import atomic, config, modelio, rundir, storage, tasks
from bigmodel_cli.errors import UserError
from bigmodel_cli.finetune_config import FinetuneConfig
from bigmodel_cli.model import quantize as quantization
from bigmodel_cli.tasks import taskinfo
from bigmodel_cli.tasks.options import TaskOptions, TaskWarning
from bigmodel_cli.train import preference as P

TASK = "preference"


def _run_config(home: Path) -> FinetuneConfig | None:
    """The finetuning recipe a run directory records, or None for any other model."""
    config_file = storage.path(home) / rundir.CONFIG_FILE
    if not (config_file.is_file() and (storage.path(home) / rundir.MODEL_FILE).is_file()):
        return None
    return config.load_config(config_file, cls=FinetuneConfig, base_dir=home)


def wins(better: np.ndarray, worse: np.ndarray) -> float:
    """Share of pairs where `better` beats `worse`, a tie counting half."""
    return float(np.mean((better > worse) + 0.5 * (better == worse)))


def run(
    model: Path,
    data: Path,
    *,
    ref: Path | None = None,
    batch_size: int = 8,
    max_examples: int = 0,
    out: Path | None = None,
    quantize: str = "",
) -> dict:
    """Reward accuracy and margin against the reference, and the log-likelihood win rate; writes metrics.json."""
    quantization.check(quantize)
    loaded = quantization.apply(modelio.load(model), quantize)
    recipe = _run_config(loaded.home)
    recorded = loaded.base_digest if ref is None else None  # a --ref given is the user's choice
    if ref is None:
        if recipe is None or not recipe.finetune.init_from:
            raise UserError(f"{model} records no starting model to compare against: pass --ref MODEL")
        ref = storage.path(recipe.finetune.init_from)
    reference = modelio.load(ref, loaded.mesh)
    if recorded is not None and modelio.checkpoint_digest(reference.params) != recorded:
        raise UserError(
            f"{ref}, the starting model {model} records, changed since (its weights differ: a run that trained "
            "on, a moved branch): pass --ref with the weights it started from"
        )
    if reference.model_cfg.vocab_size != loaded.model_cfg.vocab_size:
        raise UserError(f"--ref {ref} has another vocabulary than {model}: pass the model it was finetuned from")
    info = taskinfo.read(loaded.home)
    if recipe is not None and recipe.finetune.task == TASK:
        cfg = recipe.preference
    elif info is not None and info.preference:  # an export of a preference run: its task.json says how it was tuned
        known = {f.name for f in dataclasses.fields(P.PreferenceConfig)}
        cfg = P.PreferenceConfig(**{k: v for k, v in info.preference.items() if k in known})
    else:
        cfg = P.PreferenceConfig()
    tokenizer = loaded.tokenizer("evaluation needs the model's tokenizer")
    tokenizer.chat_template = taskinfo.chat_template(info, tokenizer)
    kind = tasks.get(TASK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TaskWarning)
        examples, _ = kind.load(storage.path(data), TaskOptions())
        examples = examples[:max_examples] if max_examples else examples
        encoded = kind.encode(examples, tokenizer, loaded.seq_len, TaskOptions(), source=str(data))
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    logps = P.all_sequence_logps(loaded.graphdef, loaded.params, encoded, batch_size, loaded.mesh)
    ref_logps = P.all_sequence_logps(reference.graphdef, reference.params, encoded, batch_size, reference.mesh)
    rewards = cfg.beta * (logps - ref_logps)  # [N, 2]: chosen, rejected
    metrics = {
        "task": TASK,
        "data": str(data),
        "ref": str(ref),
        "pairs": len(encoded["example_index"]),
        "beta": cfg.beta,
        "reward_accuracy": wins(rewards[:, 0], rewards[:, 1]),
        "reward_margin": float(np.mean(rewards[:, 0] - rewards[:, 1])),
        "win_rate": wins(logps[:, 0], logps[:, 1]),
        "rewards/chosen": float(np.mean(rewards[:, 0])),
        "rewards/rejected": float(np.mean(rewards[:, 1])),
        "logps/chosen": float(np.mean(logps[:, 0])),
        "logps/rejected": float(np.mean(logps[:, 1])),
    }
    rows = [
        {"id": examples[i].id, "logps": logps[row].tolist(), "ref_logps": ref_logps[row].tolist()}
        for row, i in enumerate(encoded["example_index"])
    ]
    _write(storage.path(out) if out is not None else rundir.eval_dir(loaded.home, TASK), rows, metrics)
    return metrics


def _write(out_dir: Path, rows: list[dict], metrics: dict) -> None:
    """predictions.jsonl (each pair's log-probabilities) and metrics.json; a directory that refuses them costs a
    warning, not the results."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out_dir / rundir.PREDICTIONS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
        atomic.write_json(out_dir / rundir.EVAL_METRICS_FILE, metrics)
    except OSError as err:
        print(f"warning: could not write results in {out_dir} ({err.strerror or err}): pass --out DIR", file=sys.stderr)
