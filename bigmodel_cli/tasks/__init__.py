"""The finetuning task kinds, by name: the one place that lists them.

Each kind is an object (tasks/base.py's Task) that reads its files into Examples, lays them out as prompt and
target, extracts answers from generated text, predicts and scores. Finetuning and evaluation look a kind up
here instead of asking which one they hold.
"""

from __future__ import annotations

from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks.base import Task
from bigmodel_cli.tasks.classify import Classify
from bigmodel_cli.tasks.instruct import Instruct
from bigmodel_cli.tasks.preference import Preference
from bigmodel_cli.tasks.qa import QA
from bigmodel_cli.tasks.summarize import Summarize
from bigmodel_cli.tasks.translate import Translate

_KINDS: dict[str, Task] = {
    kind.name: kind for kind in (QA(), Classify(), Summarize(), Translate(), Instruct(), Preference())
}
NAMES: tuple[str, ...] = tuple(_KINDS)  # in the order help texts and errors list them
# The kinds with one target per example (all but preference pairs): trained on, generated and scored as text.
SUPERVISED: tuple[str, ...] = tuple(name for name, kind in _KINDS.items() if not kind.pairs)


def get(name: str) -> Task:
    """The task kind called `name`, or a UserError listing the kinds."""
    if name not in _KINDS:
        raise UserError(f"unknown task {name!r}: choose one of {', '.join(NAMES)}")
    return _KINDS[name]
