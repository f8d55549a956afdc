"""What a finetuned model was trained for, kept in `task.json` beside its weights and carried into exports.

Evaluation and generation need the task's prompt options (languages, field names, label words), its label
set, its sequence length and, for instruct models, its chat format. A run directory, a bigmodel export and a
Hugging Face export all hold the same `task.json`, so the three give the same prompts and predictions.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bigmodel_cli import atomic, storage
from bigmodel_cli.errors import UserError
from bigmodel_cli.rundir import CONFIG_FILE, TASK_FILE
from bigmodel_cli.tasks.base import Task
from bigmodel_cli.tasks.chat import stored_template
from bigmodel_cli.tasks.options import TaskOptions


@dataclass(frozen=True)
class TaskInfo:
    task: str  # the name of its task kind (bigmodel_cli.tasks.NAMES)
    options: TaskOptions  # the [task] section the model was finetuned with
    labels: tuple[str, ...] = ()  # classify: the label words, in the order they were scored
    seq_len: int = 0  # the sequence length of finetuning (prompts are cut and windowed to it); 0 = unknown
    chat_template: str = ""  # instruct: the Jinja chat template of the prompts (Hugging Face's chat_template)
    # preference: the [preference] section it was tuned with (beta and the loss decide its implicit rewards), so
    # that an export, which has no config.toml, is scored as the run is
    preference: dict = dataclasses.field(default_factory=dict)


def write(
    run_dir: Path, kind: Task, options: TaskOptions, seq_len: int, data_info: dict, tokenizer, preference=None
) -> None:
    """Record the task a run is finetuned for; `data_info` is what loading the task file found, `tokenizer`
    the one it was encoded with (instruct: its chat template is the one trained)."""
    record = json.loads(json.dumps(data_info, default=str))  # counts and file names, for people reading it
    record.update(
        task=kind.name,
        options=dataclasses.asdict(options),
        labels=list(data_info.get("labels", [])),
        seq_len=seq_len,
        chat_template=kind.chat_template(tokenizer),
        **({"preference": dataclasses.asdict(preference)} if preference is not None else {}),
    )
    atomic.write_json(storage.path(run_dir) / TASK_FILE, record)


def read(home: Path) -> TaskInfo | None:
    """The task a model directory was finetuned for, or None for a pretrained (or foreign) model."""
    path = storage.path(home) / TASK_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        task = str(record["task"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a bigmodel task file: re-export the model or remove the file") from None
    if "options" in record:
        options = _options(record["options"])
    else:  # written before task.json carried the options: they are in the run's config.toml
        options = _options_from_config(storage.path(home))
    return TaskInfo(
        task=task,
        options=options,
        labels=tuple(str(x) for x in record.get("labels", [])),
        seq_len=int(record.get("seq_len", 0)),
        chat_template=stored_template(str(record.get("chat_template", ""))),
        preference=dict(record.get("preference") or {}),
    )


def chat_template(info: TaskInfo | None, tokenizer) -> str | None:
    """The chat template a model chats with: the one it was finetuned with, else its tokenizer's own (or None)."""
    return (info.chat_template if info is not None else "") or tokenizer.chat_template


def _options_from_config(home: Path) -> TaskOptions:
    config_file = home / CONFIG_FILE
    section = tomllib.loads(config_file.read_text(encoding="utf-8")).get("task", {}) if config_file.is_file() else {}
    return _options(section)


def _options(values: dict) -> TaskOptions:
    known = {f.name for f in dataclasses.fields(TaskOptions)}
    return TaskOptions(**{k: v for k, v in values.items() if k in known})


def copy(home: Path, out_dir: Path) -> None:
    """Carry a model's task.json (when it has one) into an export directory."""
    source = storage.path(home) / TASK_FILE
    if source.is_file():
        storage.copy_file(source, storage.path(out_dir) / TASK_FILE)
