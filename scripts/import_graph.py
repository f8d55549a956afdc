"""The package's import graph and, for one command, the path its calls take through the package's modules.

    python scripts/import_graph.py                 # module -> the package modules it imports, and any cycle
    python scripts/import_graph.py --rev COMMIT    # the same for an older commit (read with git show)
    python scripts/import_graph.py --trace -- pretrain recipes/tiny.toml --run-dir /tmp/r --set train.steps=2

Imports are read with `ast`, function-local ones included. A module's height is the longest chain of package
imports below it; a call from one module into a higher one is control going back up the graph.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bigmodel_cli"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The package modules one import statement loads (relative imports resolved; `from pkg import mod` is mod)."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        names: list[str] = []
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(["bigmodel_cli", *package, *([base] if base else [])])
        bases, names = [base], [alias.name for alias in node.names]
    found = set()
    for base in bases:
        if base != "bigmodel_cli" and not base.startswith("bigmodel_cli."):
            continue
        inner = base.removeprefix("bigmodel_cli").removeprefix(".")
        for item in names or [""]:
            candidate = f"{inner}.{item}".strip(".") if item else inner
            found.add(candidate if candidate in known else inner)
    return found & known


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its body (top level or inside functions)."""
    found = modules(package)
    known = set(found)
    graph = {}
    for name, path in found.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _imported(name, path, node, known)
        edges.discard(name)
        edges.discard("")  # the package's empty __init__
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def heights(graph: dict[str, set[str]]) -> dict[str, int]:
    """0 for a module importing no package module, else one more than its highest import (cycles cut)."""
    memo: dict[str, int] = {}

    def height(node: str, seen: frozenset) -> int:
        if node not in memo:
            below = [height(d, seen | {node}) for d in graph.get(node, ()) if d not in seen]
            memo[node] = 1 + max(below) if below else 0
        return memo[node]

    return {node: height(node, frozenset()) for node in graph}


def graph_at(rev: str) -> dict[str, set[str]]:
    """The import graph of bigmodel_cli at an older commit, checked out into a temporary directory."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "bigmodel_cli"], check=True, capture_output=True
        ).stdout
        Path(tmp, "src.tar").write_bytes(archive)
        with tarfile.open(Path(tmp, "src.tar")) as tar:
            tar.extractall(tmp, filter="data")
        return import_graph(Path(tmp) / "bigmodel_cli")


def trace(argv: list[str], graph: dict[str, set[str]]) -> dict:
    """Run `bigmodel ARGV` in this process and record every call that crosses from one package module to another."""
    crossings: Counter = Counter()

    def module_of(frame) -> str | None:
        name = frame.f_globals.get("__name__", "")
        if name == "bigmodel_cli" or name.startswith("bigmodel_cli."):
            return name.removeprefix("bigmodel_cli").removeprefix(".") or None
        return None

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None:
            return
        callee, caller = module_of(frame), module_of(frame.f_back)
        if callee and caller and callee != caller:
            crossings[caller, callee] += 1

    from bigmodel_cli import cli

    sys.argv = ["bigmodel", *argv]
    sys.setprofile(profile)
    try:
        cli.app(standalone_mode=False)
    finally:
        sys.setprofile(None)
    height = heights(graph)
    upward = {edge: n for edge, n in crossings.items() if height.get(edge[1], 0) > height.get(edge[0], 0)}
    return {
        "modules": sorted({m for edge in crossings for m in edge}),
        "crossings": sum(crossings.values()),
        "upward_edges": sorted(f"{a} -> {b} ({n} calls)" for (a, b), n in upward.items()),
        "upward_calls": sum(upward.values()),
        "edges": sorted(f"{a} -> {b} ({n} calls)" for (a, b), n in crossings.items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="read the package at this git commit instead of the working tree")
    parser.add_argument("--trace", action="store_true", help="run the bigmodel command after -- and trace it")
    parser.add_argument("--edges", action="store_true", help="with --trace: list every caller -> callee pair")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    graph = graph_at(args.rev) if args.rev else import_graph()
    if args.trace:
        result = trace([a for a in args.command if a != "--"], graph)
        print(f"modules passed through ({len(result['modules'])}): {', '.join(result['modules'])}")
        print(f"calls between modules: {result['crossings']}; calls up the graph: {result['upward_calls']}")
        for edge in result["upward_edges"]:
            print(f"  up: {edge}")
        for edge in result["edges"] if args.edges else ():
            print(f"  {edge}")
        return
    height = heights(graph)
    for module in sorted(graph, key=lambda m: (height[m], m)):
        print(f"{height[module]:2d} {module or 'bigmodel_cli'} -> {', '.join(sorted(graph[module])) or '-'}")
    print(f"modules: {len(graph)}, imports: {sum(map(len, graph.values()))}, cycles: {cycles(graph) or 'none'}")


if __name__ == "__main__":
    main()
