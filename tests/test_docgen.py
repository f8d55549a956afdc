"""docs/recipes.md is generated from the config dataclasses; these tests keep it current and complete."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass, field

from bigmodel_cli import docgen
from bigmodel_cli.config import Config
from tests.conftest import REPO

DOC = REPO / "docs" / "recipes.md"


def _undocumented(markdown: str, cls: type = Config) -> list[str]:
    """section.key of each field missing from its section's table or with an empty meaning."""
    missing = []
    for section, section_cls in docgen.sections(cls).items():
        block = markdown.split(f"\n## [{section}]\n", 1)[-1].split("\n## ", 1)[0]
        rows = {}
        for line in block.splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) == 4 and cells[0].startswith("`"):
                rows[cells[0].strip("`")] = cells[3]
        missing += [f"{section}.{f.name}" for f in dataclasses.fields(section_cls) if not rows.get(f.name)]
    return missing


def test_recipes_doc_is_current() -> None:
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert current == docgen.recipe_reference(), (
        "docs/recipes.md is out of date with bigmodel_cli/config.py: run "
        "`python -m bigmodel_cli.docgen > docs/recipes.md` and commit the result"
    )


def test_every_field_is_documented() -> None:
    missing = _undocumented(docgen.recipe_reference())
    assert not missing, f"give these fields a trailing `# comment` in bigmodel_cli/config.py: {missing}"


def test_reference_lists_every_section_and_preset() -> None:
    text = docgen.recipe_reference()
    for section in docgen.sections():
        assert f"\n## [{section}]\n" in text
    assert "| `tiny` | 128 |" in text
    assert text == docgen.recipe_reference()  # deterministic


@dataclass(frozen=True)
class _Extra:
    """Settings that only this test uses."""

    hashed: str = "a#b"  # a '#' in a string is not the comment
    spread: int = field(
        default=3,
    )  # defined over several lines
    # A comment on its own line documents nothing.
    from_metadata: str = field(default="", metadata={"doc": "documented in metadata", "path": True})
    bare: float = 1.5

    def helper(self) -> int:
        local: int = 1  # not a field
        return local


@dataclass(frozen=True)
class _FakeConfig:
    extra: _Extra = field(default_factory=_Extra)


def test_field_docs_parses_comments_and_metadata() -> None:
    assert docgen.field_docs(_Extra) == {
        "hashed": "a '#' in a string is not the comment",
        "spread": "defined over several lines",
        "from_metadata": "documented in metadata (relative to the recipe file)",
        "bare": "",
    }


def test_undocumented_field_is_caught() -> None:
    text = docgen.recipe_reference(_FakeConfig)
    assert "Settings that only this test uses." in text
    assert '| `hashed` | `str` | `"a#b"` |' in text
    assert _undocumented(text, _FakeConfig) == ["extra.bare"]


def test_dataclass_signature_is_not_a_docstring() -> None:
    assert "ModelConfig(" not in docgen.recipe_reference()


def test_check_detects_a_modified_copy(tmp_path, capsys) -> None:
    copy = tmp_path / "recipes.md"
    copy.write_text(docgen.recipe_reference(), encoding="utf-8")
    assert docgen.main(["--check", str(copy)]) == 0

    stale = docgen.recipe_reference().replace("width of the residual stream", "stale")
    copy.write_text(stale, encoding="utf-8")
    capsys.readouterr()
    assert docgen.main(["--check", str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m bigmodel_cli.docgen >" in err

    assert docgen.main(["--check", str(tmp_path / "missing.md")]) == 1


def test_module_entry_point(tmp_path) -> None:
    def docgen_cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bigmodel_cli.docgen", *args]
        return subprocess.run(command, capture_output=True, cwd=tmp_path, check=False)

    generated = docgen_cli()
    assert generated.returncode == 0
    assert generated.stdout.decode("utf-8") == docgen.recipe_reference()

    (tmp_path / "recipes.md").write_bytes(generated.stdout + b"\nhand edit\n")
    checked = docgen_cli("--check", "recipes.md")
    assert checked.returncode == 1
    assert len(checked.stderr.decode().splitlines()) == 1
