"""The package's shape: no import cycle (function-local imports count), no library module reaching up into a stage,
and no module over the size a reader can hold in their head. Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
import importlib.util

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

MAX_LINES = 450

# Modules that implement a command. Everything else is a library the stages share and must not import one of them.
STAGES = {
    "cli",
    "cli_app",
    "cli_evaluate",
    "cli_runs",
    "__main__",
    "quickstart",
    "pretrain",
    "finetune",
    "plan",
    "export",
    "report",
    "data.preprocess",
    "evaluate.lm",
    "evaluate.generate",
    "evaluate.task_eval",
    "evaluate.tokenize",
    "evaluate.inspect",
    "evaluate.suite",
    "serve",
    "serve.app",
    "serve.engine",
}
# The only stage-to-stage imports: the command line and quickstart call stages; task evaluation decodes with
# generate's sampler.
STAGE_CALLS_STAGE = {
    "quickstart": {"data.preprocess", "pretrain", "evaluate.generate", "evaluate.lm"},
    "evaluate.task_eval": {"evaluate.generate"},
    "evaluate.inspect": {"evaluate.generate"},  # opens a model as generate does
    "evaluate.suite": {"evaluate.lm", "evaluate.task_eval", "evaluate.choice"},  # a suite runs each task's own code
    # serve loads a model as generate does and samples with its sampler
    "serve": {"serve.app", "serve.engine", "evaluate.generate"},
    "serve.app": {"serve.engine"},
    "serve.engine": {"evaluate.generate"},
}


def test_the_package_has_no_import_cycle():
    assert import_graph.cycles(import_graph.import_graph()) == []


def test_the_cycle_finder_sees_function_local_imports():
    """The check itself: a cycle hidden in a function body, the way the old modelio/finetune one was, is found."""
    graph = {"modelio": {"finetune"}, "finetune": {"modelio"}, "config": set()}
    assert import_graph.cycles(graph) == [["finetune", "modelio"]]
    source = "def load():\n    from bigmodel_cli import finetune\n"
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom))
    assert import_graph._imported("modelio", import_graph.PACKAGE / "modelio.py", node, {"finetune", "modelio"}) == {
        "finetune"
    }


def test_library_modules_import_no_stage():
    graph = import_graph.import_graph()
    assert STAGES <= set(graph), f"stages missing from the package: {STAGES - set(graph)}"
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets & STAGES
        if module not in {"cli", "cli_app", "cli_evaluate", "cli_runs", "__main__"}
        and target not in STAGE_CALLS_STAGE.get(module, set())
    )
    assert upward == []


def test_no_module_is_over_450_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in import_graph.modules().items()}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}


def test_no_test_module_is_over_450_lines():
    """The tests are read as the package is: a module that outgrows the bound splits by what it tests, its shared
    data and writers going to a helpers module (chat_helpers, data_helpers, task_helpers, tpu_vm_helpers)."""
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in (REPO / "tests").glob("*.py")}
    assert len(sizes) > 50 and {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}
