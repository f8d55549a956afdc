"""No unsafe loading anywhere in the package: no pickle, no eval/exec, no remote code."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bigmodel_cli"
BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.is_file())


def test_no_pickle_eval_or_remote_code():
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                problems += [
                    f"{path}:{node.lineno} imports {n}" for n in names if n and n.split(".")[0] in BANNED_MODULES
                ]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BANNED_CALLS:
                problems.append(f"{path}:{node.lineno} calls {node.func.id}()")
            if isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "allow_pickle"):
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    problems.append(f"{path}:{node.value.lineno} passes {node.arg}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("load", "loads")
                and isinstance(node.value, ast.Name)
                and node.value.id == "torch"
            ):
                problems.append(f"{path}:{node.lineno} calls torch.{node.attr} (a pickle loader)")
    assert not problems, "\n".join(problems)


def test_the_scan_would_catch_a_pickle_import(tmp_path):
    bad = ast.parse("import pickle\nx = eval('1')\n")
    found = [n for n in ast.walk(bad) if isinstance(n, ast.Import) and n.names[0].name in BANNED_MODULES]
    calls = [n for n in ast.walk(bad) if isinstance(n, ast.Call) and getattr(n.func, "id", "") in BANNED_CALLS]
    assert found and calls
