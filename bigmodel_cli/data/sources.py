"""Where documents come from: text, JSON(L), CSV/TSV and Parquet files (plain or compressed), directories,
glob patterns and Hugging Face datasets, each read as a stream of text pieces in constant memory."""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel_cli import storage
from bigmodel_cli.data import compressed, hf_datasets
from bigmodel_cli.errors import UserError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
TXT_MODES = ("file", "line", "paragraph")
# A long document is handed on in pieces of at most this many characters, cut after a newline, so that a
# 1 GB one-document file streams like any other. The pieces of a document follow each other with no
# separator; only a line longer than this is cut inside, where its tokens may differ from an uncut encoding.
PIECE_CHARS = 1 << 16

Piece = tuple[str, bool]  # (text, is this the last piece of its document)


@dataclass(frozen=True)
class ReadOptions:
    text_fields: tuple[str, ...] = ("text",)  # record fields joined (with newlines) into a document
    txt_mode: str = "file"  # a .txt file is one document, one per line, or one per blank-line paragraph


def parse_text_fields(spec: str) -> tuple[str, ...]:
    """'title,paragraphs' -> ('title', 'paragraphs'); each may be a dotted path into nested records."""
    fields = tuple(f.strip() for f in spec.split(",") if f.strip())
    if not fields or any(not part for f in fields for part in f.split(".")):
        raise UserError(f"--text-field {spec!r} names no field: pass e.g. text, a.b or title,paragraphs")
    return fields


@dataclass(frozen=True)
class Source:
    """One input: a file of a known kind (maybe compressed) or a Hugging Face dataset."""

    name: str  # shown in errors and the manifest (no absolute path, so manifests do not depend on cwd)
    kind: str  # txt, jsonl, json, csv, tsv, parquet or hf
    path: Path | None = None
    compression: str = ""  # one of compressed.COMPRESSIONS, or ""
    hf: tuple[str, str | None, str] | None = None  # (dataset, config, split)

    def pieces(self, opts: ReadOptions) -> Iterator[Piece]:
        """The documents of this source as pieces of at most PIECE_CHARS characters."""
        if self.kind == "txt":
            return _txt_pieces(self, opts.txt_mode)
        if self.kind == "hf":
            return _record_pieces(self, hf_datasets.records(self.hf, self.name, opts.text_fields), opts.text_fields)
        readers = {"jsonl": _jsonl_records, "json": _json_records, "parquet": _parquet_records}
        if self.kind in ("csv", "tsv"):
            return _csv_pieces(self, opts.text_fields)
        return _record_pieces(self, readers[self.kind](self, opts.text_fields), opts.text_fields)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input's content: size and sha256 of a file, the cache fingerprint of a dataset."""
        if self.path is None:
            return {"name": self.name, "fingerprint": hf_datasets.load(self.hf, self.name)._fingerprint}
        digest, size = hashlib.sha256(), 0
        with self.path.open("rb") as f:  # a local file or a gs:// object alike
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        return {"name": self.name, "bytes": size, "sha256": digest.hexdigest()}


# ---- finding the inputs -----------------------------------------------------------------------


def _file_kind(path: Path) -> tuple[str, str] | None:
    """(kind, compression) from the name, e.g. x.jsonl.zst -> ('jsonl', '.zst'); None if unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in compressed.COMPRESSIONS else ""
    kind = KINDS.get(suffixes[-1]) if suffixes else None
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


def _file_source(path: Path, name: str) -> Source:
    found = _file_kind(path)
    if found is None:
        known = ", ".join(KINDS)
        raise UserError(
            f"{path}: unsupported file type {''.join(path.suffixes)!r}; use {known} (text kinds may end in "
            f"{', '.join(compressed.COMPRESSIONS)})"
        )
    return Source(name=name, kind=found[0], path=path, compression=found[1])


def _files_below(root: Path) -> list:
    """Every file under a directory, or under a bucket prefix (epath refuses rglob there, so it is listed level
    by level)."""
    if not storage.is_url(root):
        return [p for p in root.rglob("*") if p.is_file()]
    children = list(root.iterdir())
    return [p for p in children if p.is_file()] + [f for p in children if p.is_dir() for f in _files_below(p)]


def _dir_sources(root: Path) -> list[Source]:
    files = sorted(p for p in _files_below(root) if _file_kind(p) is not None)
    if not files:
        raise UserError(f"{root} holds no {', '.join(KINDS)} files: point at data files")
    return [_file_source(p, f"{root.name}/{p.relative_to(root).as_posix()}") for p in files]


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][@SPLIT]' -> (NAME, CONFIG or None, SPLIT, default 'train')."""
    body = spec[len("hf:") :]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise UserError(f"{spec!r}: name a dataset, e.g. hf:wikitext:wikitext-2-raw-v1@train")
    return name, config or None, split or "train"


def expand(inputs: tuple[str | Path, ...] | list[str | Path]) -> list[Source]:
    """Files, directories (searched recursively), glob patterns and hf: names -> sources, in a fixed order."""
    sources: list[Source] = []
    for item in inputs:
        text = str(item)
        storage.check_client(text, "input")
        path = storage.path(text)  # a gs:// object, prefix or pattern is read where it lies
        if text.startswith("hf:"):
            sources.append(Source(name=text, kind="hf", hf=parse_hf(text)))
        elif path.is_dir():
            sources += _dir_sources(path)
        elif path.is_file():
            sources.append(_file_source(path, path.name))
        elif any(c in text for c in "*?["):
            matches = _glob(text)
            files = [m for m in matches if m.is_file() and _file_kind(m) is not None]
            for m in matches:
                if m.is_dir():
                    files += [s.path for s in _dir_sources(m)]
            if not files:
                raise UserError(f"the pattern {text!r} matches no data files: check it (quote it for the shell)")
            sources += [_file_source(p, p.name) for p in sorted(set(files))]
        else:
            raise UserError(f"input {text} not found: check the path (or write hf:NAME for a Hugging Face dataset)")
    return sources


def _glob(pattern: str) -> list:
    """The paths a glob pattern matches, `**` spanning directories: local ones, or objects and prefixes in a
    bucket (matched below the pattern's last fixed directory)."""
    if not storage.is_url(pattern):
        return sorted(Path(m) for m in glob.glob(pattern, recursive=True))
    if "**" in pattern:  # epath refuses it in a bucket: one listing request per prefix below
        raise UserError(f"{pattern}: a gs:// pattern cannot hold **: name the prefix itself, read with all below it")
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    return sorted(storage.path("/".join(parts[:fixed])).glob("/".join(parts[fixed:])))


# ---- reading files ----------------------------------------------------------------------------


def _read(src: Source, block: int | None) -> Iterator[str]:
    return compressed.read_text(src.path, src.compression, src.name, block)


def _lines(src: Source) -> Iterator[str]:
    return _read(src, None)


def cut(text: str) -> list[str]:
    """A document's text in pieces of at most PIECE_CHARS characters, cut after newlines where possible."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        end = text.rfind("\n", start, start + PIECE_CHARS) + 1
        if end <= start:  # one very long line: cut inside it
            end = start + PIECE_CHARS
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _doc_pieces(text: str) -> Iterator[Piece]:
    if not text.strip():
        return
    parts = cut(text)
    for i, part in enumerate(parts):
        yield part, i == len(parts) - 1


class _Document:
    """Text of one document as it streams in, handed on in pieces once it holds more than PIECE_CHARS."""

    def __init__(self):
        self.parts: list[str] = []
        self.size, self.has_text = 0, False

    def add(self, text: str) -> Iterator[Piece]:
        self.parts.append(text)
        self.size += len(text)
        self.has_text = self.has_text or bool(text.strip())
        if self.size > PIECE_CHARS and self.has_text:  # (a whitespace-only start is held back)
            *done, rest = cut("".join(self.parts))
            yield from ((piece, False) for piece in done)
            self.parts, self.size = [rest], len(rest)

    def end(self, strip_newline: bool) -> Iterator[Piece]:
        text = "".join(self.parts)
        if self.has_text:
            yield (text.rstrip("\n") if strip_newline else text), True
        self.parts, self.size, self.has_text = [], 0, False


def _txt_pieces(src: Source, mode: str) -> Iterator[Piece]:
    """A .txt file's documents. It is read in blocks and split in C, not line by line: the per-line Python
    work of a readline loop cost more than the encoding itself."""
    if mode not in TXT_MODES:
        raise UserError(f"--txt-mode must be one of {', '.join(TXT_MODES)}; got {mode!r}")
    doc = _Document()
    if mode == "file":
        for block in _read(src, PIECE_CHARS):
            yield from doc.add(block)
        yield from doc.end(strip_newline=False)
        return
    tail, continuing = "", False  # the last block's unfinished line; whether part of it went to doc already
    for block in itertools.chain(_read(src, PIECE_CHARS), [None]):
        if block is None:  # the end: an unfinished last line is a line too
            lines, tail = ([tail] if tail else []), ""
        else:
            lines = (tail + block).split("\n")
            tail = lines.pop()
        for line in lines:
            if mode == "line":
                if continuing:  # the end of a line longer than a piece
                    yield from doc.add(line)
                    yield from doc.end(strip_newline=False)
                elif len(line) <= PIECE_CHARS:
                    if line.strip():
                        yield line, True
                else:
                    yield from _doc_pieces(line)
            elif continuing or line.strip():
                yield from doc.add(line + "\n")
            else:  # a blank line closes the paragraph
                yield from doc.end(strip_newline=True)
            continuing = False
        if len(tail) > PIECE_CHARS and tail.strip():  # a very long line: hand it on in pieces as it comes
            yield from doc.add(tail)
            tail, continuing = "", True
    yield from doc.end(strip_newline=True)


# ---- records: JSON(L), Parquet, CSV, Hugging Face ---------------------------------------------


class _MissingField(Exception):
    pass


def _lookup(value: Any, path: list[str]) -> Any:
    """Follow a dotted path; a list on the way applies the rest of the path to each element."""
    for i, key in enumerate(path):
        if isinstance(value, list):
            return [_lookup(v, path[i:]) for v in value]
        if not isinstance(value, dict) or key not in value:
            raise _MissingField(key)
        value = value[key]
    return value


def _as_text(value: Any, where: str, field: str) -> str:
    """A field's value as text: strings as they are, lists (of lists) of strings joined with newlines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(t for t in (_as_text(v, where, field) for v in value) if t)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: field {field!r} holds a {type(value).__name__}, not text: pass --text-field NAME")


def record_text(record: Any, fields: tuple[str, ...], where: str) -> str:
    """The document of one record: its text fields joined with newlines (a bare string is its own text)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object with a text field")
    parts = []
    for field in fields:
        try:
            value = _lookup(record, field.split("."))
        except _MissingField:
            keys = ", ".join(list(record)[:12]) or "none"
            raise UserError(f"{where} has no field {field!r} (it has: {keys}): pass --text-field NAME") from None
        text = _as_text(value, where, field)
        if text:
            parts.append(text)
    return "\n".join(parts)


def _record_pieces(src: Source, records: Iterator[tuple[Any, str]], fields: tuple[str, ...]) -> Iterator[Piece]:
    for record, where in records:
        yield from _doc_pieces(record_text(record, fields, where))


def _jsonl_records(src: Source, fields: tuple[str, ...]) -> Iterator[tuple[Any, str]]:
    for number, line in enumerate(_lines(src), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{src.name}:{number}"
        except json.JSONDecodeError as err:
            raise UserError(f"{src.name}:{number} is not valid JSON ({err.msg}): fix or remove the line") from None


def _find_records(value: Any, keys: set[str]) -> Iterator[Any]:
    """The outermost objects that hold every key, depth first (so {"data": [{...}, ...]} works too)."""
    if isinstance(value, dict):
        if keys <= value.keys():
            yield value
            return
        for v in value.values():
            yield from _find_records(v, keys)
    elif isinstance(value, list):
        for v in value:
            yield from _find_records(v, keys)


def _json_records(src: Source, fields: tuple[str, ...]) -> Iterator[tuple[Any, str]]:
    """Records of a .json file, which is parsed whole (use JSON lines for corpora larger than memory)."""
    text = "".join(_lines(src))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines under a .json name
            yield from _jsonl_records(src, fields)
            return
        raise UserError(f"{src.name} is not valid JSON ({err.msg}, line {err.lineno}): fix it") from None
    del text
    if isinstance(data, list) and all(isinstance(v, str) for v in data):
        yield from ((v, f"{src.name}[{i}]") for i, v in enumerate(data))
        return
    keys = {f.split(".")[0] for f in fields}
    found = False
    for i, record in enumerate(_find_records(data, keys)):
        found = True
        yield record, f"{src.name} record {i}"
    if not found:
        raise UserError(
            f"{src.name}: no JSON object holds the field(s) {', '.join(sorted(keys))}: pass --text-field NAME"
        )


def _parquet_records(src: Source, fields: tuple[str, ...]) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    with src.path.open("rb") as file:  # a file object: pyarrow would not open a gs:// epath by its name
        try:
            table = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises its own error types
            raise UserError(f"{src.name} is not a valid Parquet file ({err}): check it") from None
        columns = table.schema_arrow.names
        wanted = list(dict.fromkeys(f.split(".")[0] for f in fields))
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise UserError(
                f"{src.name} has no column {missing[0]!r} (columns: {', '.join(columns)}): pass --text-field"
            )
        row = 0
        for batch in table.iter_batches(batch_size=1024, columns=wanted):
            for record in batch.to_pylist():
                yield record, f"{src.name} row {row}"
                row += 1


def _csv_pieces(src: Source, fields: tuple[str, ...]) -> Iterator[Piece]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be far longer than the 128 KB default
    tsv = src.kind == "tsv"
    # TSV has no quoting: a " is just a character (SST-2 sentences hold plenty).
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    rows = csv.DictReader(_lines(src), delimiter="\t" if tsv else ",", quoting=quoting)
    try:
        header = rows.fieldnames or []
        missing = [f for f in fields if f not in header]
        if missing:
            raise UserError(
                f"{src.name} has no column {missing[0]!r} (columns: {', '.join(header) or 'none'}): pass --text-field"
            )
        for number, row in enumerate(rows, start=2):
            yield from _doc_pieces(record_text({f: row[f] for f in fields}, fields, f"{src.name}:{number}"))
    except csv.Error as err:
        raise UserError(f"{src.name}:{rows.line_num} is not valid {src.kind.upper()} ({err}): fix it") from None
