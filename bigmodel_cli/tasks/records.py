"""Reading task files: whole texts, JSON, JSONL and CSV/TSV records (with or without a header row), and the
one-line-per-file warnings for records that are skipped.

A file is read through the same decompressing reader as preprocess (data/compressed.py): x.json.gz, x.csv.zst,
x.tsv.bz2 or x.de.xz hold what the plain file would, and their kind is the name without the compression suffix.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bigmodel_cli import storage
from bigmodel_cli.data import compressed
from bigmodel_cli.errors import UserError
from bigmodel_cli.tasks.options import TaskWarning

_BLOCK_CHARS = 1 << 20  # a whole file is read in blocks this large, then joined


def _compression(path: Path) -> str:
    """The compression suffix of a file name (one of compressed.COMPRESSIONS), or ""."""
    suffix = path.suffix.lower()
    return suffix if suffix in compressed.COMPRESSIONS else ""


def read_text(path: Path, what: str) -> str:
    """A whole (maybe compressed) UTF-8 text file, local or in a bucket, or a UserError naming the fix."""
    path = storage.path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: pass an existing {what} file")
    try:
        text = "".join(compressed.read_text(path, _compression(path), str(path), _BLOCK_CHARS))
    except OSError as err:  # what the reader leaves to its caller: a file we may not open
        raise UserError(f"{path} is not readable UTF-8 text ({err}): pass a UTF-8 {what} file") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark (spreadsheet exports write one) is not data
    if not text.strip():
        raise UserError(f"{path} is empty: pass a {what} file with data")
    return text


def lines(text: str) -> list[str]:
    """The lines of a text read_text returned, split at "\n" only, as JSON Lines and `wc -l` count them:
    str.splitlines also splits at U+2028, U+0085 and form feeds, which JSON strings and sentences may hold."""
    parts = text.split("\n")
    return parts[:-1] if parts[-1] == "" else parts


def file_kind(path: Path) -> str:
    """The format suffix, ignoring a compression suffix: 'json', 'jsonl', 'csv', 'tsv', ..."""
    path = storage.path(path)
    name = path.with_suffix("") if _compression(path) else path
    return name.suffix.lower().lstrip(".")


def read_json(path: Path, what: str) -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}): fix the file") from None


def read_jsonl(path: Path, what: str) -> list[tuple[str, dict]]:
    """(where, record) for every non-blank line; `where` is 'file:line' for error messages."""
    records = []
    for number, line in enumerate(lines(read_text(path, what)), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg}): fix or remove the line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append((f"{path}:{number}", record))
    return records


def json_records(path: Path, what: str, expected: str) -> list[tuple[str, dict]]:
    """(where, record) of a JSONL file or of a JSON list of objects; `expected` names the records for the error
    that refuses anything else."""
    if file_kind(path) == "jsonl":
        return read_jsonl(path, what)
    data = read_json(path, f"{what} JSON")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected {expected}")
    return [(f"{path} record {i}", r) for i, r in enumerate(data, start=1)]


def records(path: Path, what: str, columns: list[str], needed: Sequence[tuple[str, str]]) -> list[tuple[str, dict]]:
    """Rows of a JSONL, CSV or TSV file as (where, dict); CSV/TSV columns are named by the first row or by
    task.columns. `needed` holds (field, option) pairs that the columns must include."""
    kind = file_kind(path)
    if kind == "jsonl":
        return read_jsonl(path, what)  # records name their fields: task.columns does not apply
    if kind not in ("csv", "tsv"):
        raise UserError(
            f"{path}: {what} files must be .jsonl, .csv or .tsv (optionally {', '.join(compressed.COMPRESSIONS)}), "
            f"got {kind or 'no suffix'!r}"
        )
    # GLUE-style TSVs are unquoted and contain stray quote characters, so quoting is off for TSV only.
    quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(read_text(path, what)), delimiter="\t" if kind == "tsv" else ",", quoting=quoting)
    rows = [(reader.line_num, [cell.strip() for cell in cells]) for cells in reader if cells]
    names = list(columns)
    if names:
        if rows and rows[0][1] == names:
            rows = rows[1:]  # the file has the header after all: it is not data
        for name, option in needed:
            if name not in names:
                raise UserError(
                    f"{path}: task.columns ({','.join(columns)}) has no {name!r}: name that column {name} there, "
                    f"or set task.{option} to one of its names"
                )
    elif rows:
        names, rows = rows[0][1], rows[1:]
        missing = [(name, option) for name, option in needed if name not in names]
        if missing and any(_looks_like_data(cell) for cell in names):
            guess = _guess_columns([names] + [cells for _, cells in rows[:20]], needed)
            raise UserError(
                f"{path} seems to have no header row (its first row {_short(names)} looks like data): name its "
                f"columns with --columns {guess} (or --set task.columns={guess})"
            )
        if missing:
            raise _no_field(f"{path}:1", names, *missing[0])
    # Missing cells read as "" (the row is then skipped as empty); cells beyond the named columns are ignored.
    return [(f"{path}:{line}", dict(zip(names, [*cells, *[""] * len(names)], strict=False))) for line, cells in rows]


def _looks_like_data(cell: str) -> bool:
    """A header cell no header would hold: a number, or a phrase of several words."""
    try:
        float(cell)
        return True
    except ValueError:
        return len(cell.split()) > 3


def _guess_columns(rows: list[list[str]], needed: Sequence[tuple[str, str]]) -> str:
    """Column names for headerless rows: the label on the shortest column, other fields on the longest ones."""
    width = len(rows[0])
    length = [sum(len(row[i]) for row in rows if i < len(row)) for i in range(width)]  # total, over the rows
    names = [f"col{i}" for i in range(1, width + 1)]
    free = list(range(width))
    for name, option in sorted(needed, key=lambda n: n[1] != "label_field"):
        if not free:
            break
        at = (min if option == "label_field" else max)(free, key=lambda i: length[i])
        names[at] = name
        free.remove(at)
    return ",".join(names)


def _short(cells: list[str]) -> str:
    """A row for a one-line message: its cells, each cut to 30 characters."""
    return "[" + ", ".join(repr(c if len(c) <= 30 else c[:27] + "...") for c in cells) + "]"


def _no_field(where: str, fields: Sequence, name: str, option: str) -> UserError:
    shown = ", ".join(map(str, fields)) or "none"
    return UserError(f"{where}: no field {name!r} (fields: {shown}): set task.{option} to the right name")


def field(where: str, record: dict, name: str, option: str) -> str:
    """record[name] as stripped text, or a UserError naming the option that selects the field."""
    if name not in record:
        raise _no_field(where, list(record), name, option)
    return text(record[name])


def text(value: Any) -> str:
    return "" if value is None else str(value).strip()


class Skipped:
    """Records left out for an empty required field: counted, and reported as one warning line per file."""

    def __init__(self, path: Path, things: str, ids: str = "ids"):
        self.path, self.things, self.label = path, things, ids
        self.ids: list[str] = []
        self.reasons: list[str] = []  # e.g. "an empty question", in order of first appearance

    def add(self, id_: str, reason: str) -> None:
        self.ids.append(id_)
        if reason not in self.reasons:
            self.reasons.append(reason)

    def report(self, info: dict) -> None:
        """Store the count in the task info and warn once (naming the file and the first ids) if any."""
        info["skipped_empty"] = len(self.ids)
        if self.ids:
            shown = ", ".join(self.ids[:3]) + (", ..." if len(self.ids) > 3 else "")
            warn(
                f"{self.path}: skipped {len(self.ids)} {self.things} with {' or '.join(self.reasons)} "
                f"({self.label}: {shown})"
            )


def warn(message: str) -> None:
    warnings.warn(message, TaskWarning, stacklevel=3)
