"""`report` and `runs`: plot the metrics of one or more runs into a PNG or a self-contained HTML page, and list
the runs under a directory with their progress."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from bigmodel_cli import atomic, rundir, storage
from bigmodel_cli.errors import UserError
from bigmodel_cli.rundir import CONFIG_FILE, EVAL_METRICS_FILE, METRICS_FILE, STATUS_FILE, SUITE_FILE, eval_dir

FORMATS = (".png", ".html")
Table = tuple[list[str], list[list[str]]]  # header, rows


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of RUN_DIR/metrics.jsonl sorted by step, with rows logged for the same step merged."""
    by_step: dict[int, dict[str, Any]] = {}
    with (run_dir / METRICS_FILE).open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a killed or still-running writer
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                # Later lines win, so a resumed run overrides what the killed run wrote for the same step.
                by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file, or {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    """The last non-null value of key, or None."""
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def _summary(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Last step, loss and val_loss of a run."""
    return {
        "path": run_dir,
        "step": rows[-1]["step"] if rows else None,
        "loss": _last(rows, "loss"),
        "val_loss": _last(rows, "val_loss"),
    }


def _mtime(path: Path) -> float | None:
    try:
        info = path.stat()
    except OSError:
        return None
    # An object in a bucket (epath) has whole-second `mtime`: a config and a status written in the same second
    # tie, and the status is read.
    return info.mtime if storage.is_url(path) else info.st_mtime


def _status(run_dir: Path) -> dict[str, Any]:
    """status.json ({"state", "step"}), or state "starting" while a run that has just (re)started has not written it."""
    # Training writes status.json ("starting") right after config.toml. Between the two writes, and in runs made
    # by versions that wrote the status only after compiling, a config newer than both the status and the
    # metrics is a starting run. A run without status.json that logged after its config was written is one
    # whose state is not recorded.
    config = _mtime(run_dir / CONFIG_FILE)
    since = [_mtime(run_dir / name) for name in (STATUS_FILE, METRICS_FILE)]
    if config is not None and all(t is None or t < config for t in since):
        return {"state": "starting"}
    return _read_json(run_dir / STATUS_FILE)


def _target_steps(run_dir: Path) -> int | None:
    """train.steps from the run's config.toml, or None when it cannot be read."""
    try:
        steps = tomllib.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("train", {}).get("steps")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Run dirs (holding metrics.jsonl or config.toml) at most two levels under root, with their progress."""
    root = storage.path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass the folder that holds your runs")
    candidates = [root, *root.glob("*"), *root.glob("*/*")]
    runs = []
    for d in sorted(candidates):
        if not d.is_dir() or any(part.startswith(".") for part in d.relative_to(root).parts):
            continue
        if not ((d / METRICS_FILE).is_file() or (d / CONFIG_FILE).is_file()):
            continue
        rows = read_metrics(d) if (d / METRICS_FILE).is_file() else []
        status = _status(d)
        state = str(status.get("state", "unknown"))
        if state in ("starting", "running") and rundir.writer_gone(d):  # its process died without a word
            state = "killed"
        row = _summary(d, rows) | {"total_steps": _target_steps(d), "status": state}
        if row["step"] is None:  # nothing logged yet: the step the run started from, if it says
            step = status.get("step", 0 if row["status"] == "starting" else None)
            row["step"] = step if isinstance(step, int) else None
        runs.append(row)
    return runs


def print_runs(runs: list[dict[str, Any]], root: Path, json_lines: bool = False) -> None:
    """Print list_runs(root)'s rows as a table, or as one JSON object per line."""
    if json_lines:
        for row in runs:
            print(json.dumps({k: (str(v) if k == "path" else v) for k, v in row.items()}))
        return
    if not runs:
        print(f"no runs under {root}")
        return
    width = max(len(str(r["path"])) for r in runs)
    print(f"{'run':<{width}}  {'step':>7}  {'loss':>8}  {'val_loss':>8}  status")
    for r in runs:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(
            f"{str(r['path']):<{width}}  {r['step'] if r['step'] is not None else '-':>7}  {loss:>8}  {val:>8}  "
            f"{r['status']}"
        )


def _labels(run_dirs: list[Path]) -> list[str]:
    """Short run names: directory names, or full paths when those names collide."""
    names = [d.name if storage.is_url(d) else d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(run_dirs: list[Path], runs: list[list[dict[str, Any]]]) -> Table:
    """Header and rows of the final-metrics table: last logged values, then metrics.json values."""
    finals = [_read_json(d / EVAL_METRICS_FILE) for d in run_dirs]
    final_keys = sorted({k for f in finals for k in f})
    header = ["run", "step", "loss", "val_loss", *(f"final {k}" for k in final_keys)]
    body = []
    for label, d, rows, final in zip(_labels(run_dirs), run_dirs, runs, finals, strict=True):
        s = _summary(d, rows)
        last = [_fmt(s[k]) for k in ("step", "loss", "val_loss")]
        body.append([label, *last, *(_fmt(final.get(k)) for k in final_keys)])
    return header, body


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of key; nulls (NaN/inf when logged) become NaN so they show as gaps."""
    pairs = [(r["step"], math.nan if r[key] is None else float(r[key])) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _render_png(labels: list[str], runs: list[list[dict[str, Any]]], table: Table) -> bytes:
    """The 2x2 figure as PNG bytes."""
    # Figure without pyplot renders through Agg and keeps no global figure state, so it is safe headless.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 9), dpi=100, layout="constrained")
    (ax_loss, ax_lr), (ax_tps, ax_table) = fig.subplots(2, 2)
    panels = [(ax_loss, "loss", "Loss"), (ax_lr, "lr", "Learning rate"), (ax_tps, "tokens_per_s", "Tokens/s")]
    for i, (label, rows) in enumerate(zip(labels, runs, strict=True)):
        color = f"C{i % 10}"
        for ax, key, _ in panels:
            ax.plot(*_series(rows, key), color=color, label=label)
        val_steps, val_loss = _series(rows, "val_loss")
        ax_loss.plot(val_steps, val_loss, color=color, linestyle="--", marker=".", label=f"{label} (val)")
    for ax, _, title in panels:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize="small")

    header, body = table
    ax_table.axis("off")
    ax_table.set_title("Final metrics")
    cells = ax_table.table(cellText=body, colLabels=header, loc="upper center", cellLoc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(9)
    cells.auto_set_column_width(list(range(len(header))))
    cells.scale(1, 1.5)

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _suites(run_dirs: list[Path]) -> list[tuple[str, Table]]:
    """Each run's evaluation suites (`evaluate --suite` writes RUN/eval-suite-NAME/suite.json): title, table."""
    found = []
    for label, d in zip(_labels(run_dirs), run_dirs, strict=True):
        for path in sorted(d.glob(f"{eval_dir(d, 'suite-*').name}/{SUITE_FILE}")):
            suite = _read_json(path)
            table = suite.get("table") or {}
            if isinstance(table.get("header"), list) and isinstance(table.get("rows"), list):
                title = f"{label}: {Path(str(suite.get('suite', path.parent.name))).name}"
                found.append((title, (table["header"], table["rows"])))
    return found


def _html_table(table: Table) -> str:
    header, body = table
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _render_html(png: bytes, table: Table, suites: list[tuple[str, Table]] = ()) -> bytes:
    """A standalone page: the figure inlined as base64, the final-metrics table, then any evaluation suites."""
    image = base64.b64encode(png).decode("ascii")
    sections = "".join(f"<h2>Evaluation suite {html.escape(title)}</h2>\n{_html_table(t)}\n" for title, t in suites)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>bigmodel report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>bigmodel report</h1>
<img src="data:image/png;base64,{image}" alt="training curves">
<h2>Final metrics</h2>
{_html_table(table)}
{sections}</body></html>
"""
    return page.encode("utf-8")


def run(run_dirs: list[Path], out: Path) -> Path:
    """Plot loss, val_loss, learning rate and throughput of the runs, and tabulate their final metrics."""
    out = storage.path(out)
    if out.suffix.lower() not in FORMATS:
        fmt = out.suffix or "(none)"
        raise UserError(f"unsupported report format {fmt!r}: give an output path ending in .png or .html")
    if not run_dirs:
        raise UserError("no run directories given: pass at least one RUN_DIR")
    run_dirs = [storage.path(d) for d in run_dirs]
    runs = []
    for d in run_dirs:
        if not d.is_dir():
            raise UserError(f"run directory {d} does not exist: pass the RUN_DIR of a training run")
        if not (d / METRICS_FILE).is_file():
            raise UserError(f"{d} has no {METRICS_FILE}: pass a run directory that training has logged to")
        rows = read_metrics(d)
        if not rows:
            raise UserError(f"{d / METRICS_FILE} holds no metrics: wait until the run logs its first step")
        runs.append(rows)

    table = _table(run_dirs, runs)
    png = _render_png(_labels(run_dirs), runs, table)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = png if out.suffix.lower() == ".png" else _render_html(png, table, _suites(run_dirs))
    atomic.write_bytes(out, page)  # never half a report
    return out
