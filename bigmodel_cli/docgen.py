"""Generate docs/recipes.md from the recipe dataclasses, so the reference cannot drift from the code.

Regenerate with `python -m bigmodel_cli.docgen > docs/recipes.md`;
`python -m bigmodel_cli.docgen --check docs/recipes.md` exits 1 when the file is out of date.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

from bigmodel_cli.config import PRESETS, Config, ModelConfig

REGENERATE = "python -m bigmodel_cli.docgen > docs/recipes.md"


def _own_comments(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each annotated field in cls's own class body, by field name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. made by make_dataclass): metadata["doc"] still works
        return {}
    comments: dict[str, str] = {}
    depth = 0
    statement: list[tokenize.TokenInfo] = []
    # Tokens rather than a regex: a '#' inside a string default is not a comment, and a field may span lines.
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE or (tok.type == tokenize.NL and not _has_code(statement)):
            # A full-line comment above a field belongs to no field, so it is dropped with its NL.
            if depth == 1 and tok.type == tokenize.NEWLINE:
                _record_field(statement, comments)
            statement = []
        elif tok.type != tokenize.NL:
            statement.append(tok)
    return comments


def _has_code(tokens: list[tokenize.TokenInfo]) -> bool:
    return any(t.type != tokenize.COMMENT for t in tokens)


def _record_field(tokens: list[tokenize.TokenInfo], comments: dict[str, str]) -> None:
    code = [t for t in tokens if t.type != tokenize.COMMENT]
    if len(code) >= 2 and code[0].type == tokenize.NAME and code[1].string == ":":
        text = " ".join(t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT)
        if text:
            comments[code[0].string] = text


def field_docs(cls: type) -> dict[str, str]:
    """The meaning of every field of a dataclass: its source comment, else metadata["doc"], else ""."""
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a subclass's comment wins over the one it redefines
        if dataclasses.is_dataclass(base):
            comments.update(_own_comments(base))
    docs = {}
    for f in dataclasses.fields(cls):
        text = comments.get(f.name) or str(f.metadata.get("doc", "")).strip()
        if text and f.metadata.get("path"):
            text += " (relative to the recipe file)"
        docs[f.name] = text
    return docs


def _docstring(cls: type) -> str:
    """The class docstring, or "" when it is only the signature that @dataclass makes up."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return repr(hint).replace("typing.", "")


def _value(value: Any) -> str:
    """A default written the way it is written in a TOML recipe."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_value(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_value(f.default_factory())}`"
    return "required"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def sections(cls: type = Config) -> dict[str, type]:
    """Recipe section name -> its dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        section_cls = hints[f.name]
        if not (isinstance(section_cls, type) and dataclasses.is_dataclass(section_cls)):
            raise TypeError(f"{cls.__name__}.{f.name} is not a dataclass, so it is no recipe section")
        out[f.name] = section_cls
    return out


def _section_markdown(name: str, section_cls: type) -> list[str]:
    lines = [f"## [{name}]", ""]
    if doc := _docstring(section_cls):
        lines += [doc, ""]
    hints = typing.get_type_hints(section_cls)
    docs = field_docs(section_cls)
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(section_cls):
        lines.append(_row([f"`{f.name}`", f"`{_type_name(hints[f.name])}`", _default(f), docs[f.name]]))
    return lines + [""]


def _presets_markdown(presets: dict[str, dict[str, Any]]) -> list[str]:
    order = [f.name for f in dataclasses.fields(ModelConfig)]
    used = {key for values in presets.values() for key in values}
    columns = [k for k in order if k in used] + sorted(used - set(order))
    lines = [
        "## Model presets",
        "",
        "`model.preset = NAME` starts `[model]` from these values; any key set in `[model]` (or with `--set`)"
        " overrides them. An empty cell keeps the default above.",
        "",
        _row(["preset", *(f"`{c}`" for c in columns)]),
        "| " + " | ".join("---" for _ in range(len(columns) + 1)) + " |",
    ]
    for name, values in presets.items():
        lines.append(_row([f"`{name}`", *(_value(values[c]) if c in values else "" for c in columns)]))
    return lines + [""]


def recipe_reference(cls: type = Config) -> str:
    """The recipes reference as Markdown, generated from the config dataclasses and PRESETS."""
    parts = sections(cls)
    names = " ".join(f"`[{name}]`" for name in parts)
    lines = [
        f"<!-- Generated from bigmodel_cli/config.py; do not edit. Regenerate with: {REGENERATE} -->",
        "",
        "# Recipe reference",
        "",
        f"A recipe is a TOML file with the sections {names}, each mapped one to one onto a frozen dataclass"
        " in `bigmodel_cli/config.py`. Every key is optional and takes the default below when left out."
        " Override any key from the command line with `--set section.key=value` (repeatable, parsed to the"
        " key's type). An unknown section or key is an error that names the closest valid one. Paths in a"
        " recipe resolve relative to the recipe file; paths given with `--set` resolve relative to the"
        " current directory. The fully resolved config is written to `RUN_DIR/config.toml`.",
        "",
    ]
    for name, section_cls in parts.items():
        lines += _section_markdown(name, section_cls)
    lines += _presets_markdown(PRESETS)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or with --check FILE exit 1 when FILE differs from it."""
    description = "Print docs/recipes.md, generated from bigmodel_cli/config.py."
    parser = argparse.ArgumentParser(prog="python -m bigmodel_cli.docgen", description=description)
    parser.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE is not the current output")
    args = parser.parse_args(argv)
    text = recipe_reference()
    if args.check is None:
        # Bytes, so the file is UTF-8 with \n line ends whatever the locale or platform.
        out = getattr(sys.stdout, "buffer", None)
        if out is None:
            sys.stdout.write(text)
        else:
            sys.stdout.flush()
            out.write(text.encode("utf-8"))
            out.flush()
        return 0
    fix = f"python -m bigmodel_cli.docgen > {args.check}"
    try:
        current = args.check.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(f"{args.check} cannot be read ({err}): run `{fix}`", file=sys.stderr)
        return 1
    if current != text:
        print(f"{args.check} is out of date with bigmodel_cli/config.py: run `{fix}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
