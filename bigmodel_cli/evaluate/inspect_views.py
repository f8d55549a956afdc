"""The pictures `bigmodel inspect` draws: a PNG grid of every layer's and head's attention map (matplotlib), and
one self-contained HTML page (data embedded as JSON, no network) where a layer and head are picked, above the
logit lens's table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

TICK_LIMIT = 24  # prompts up to this many tokens get token labels on the PNG's axes
CJK_FONT_HINTS = ("CJK", "WenQuanYi", "Noto Sans SC", "Source Han", "SimHei", "Droid Sans Fallback")


def _cjk_fonts() -> list[str]:
    """Installed fonts that draw Chinese, for matplotlib to fall back on after its default font."""
    from matplotlib import font_manager

    return sorted({f.name for f in font_manager.fontManager.ttflist if any(h in f.name for h in CJK_FONT_HINTS)})


def _visible(label: str) -> str:
    """A token label whose spaces and newlines show, as the HTML page writes them."""
    return json.dumps(label, ensure_ascii=False)[1:-1].replace(" ", "\u2423")


def grid_png(attention: np.ndarray, labels: list[str], path: Path) -> None:
    """attention [L,H,T,T] as one PNG: a row per layer, a column per head, query positions down, keys across."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    n_layers, n_heads, t, _ = attention.shape
    panel = max(0.8, min(2.4, 24 / max(n_heads, n_layers)))  # inches: the whole grid stays under ~2,600 pixels
    labelled = t <= TICK_LIMIT
    labels = [_visible(label) for label in labels]
    margin = 1.2 if labelled else 0.5
    style = {"font.family": ["DejaVu Sans", *_cjk_fonts()], "font.size": 7}
    with matplotlib.rc_context(style), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # no CJK font installed: boxes, not noise
        size = (n_heads * panel + margin + 0.8, n_layers * panel + margin + 0.4)
        fig = Figure(figsize=size, dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(n_layers, n_heads, squeeze=False)
        norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)  # the square root spreads the many small probabilities
        image = None
        for layer in range(n_layers):
            for head in range(n_heads):
                ax = axes[layer, head]
                image = ax.imshow(attention[layer, head], cmap="viridis", norm=norm, interpolation="nearest")
                ax.set_title(f"layer {layer} head {head}", fontsize=6, pad=2)
                ax.set_xticks([])
                ax.set_yticks([])
                if labelled and head == 0:
                    ax.set_yticks(range(t), labels, fontsize=5)
                if labelled and layer == n_layers - 1:
                    ax.set_xticks(range(t), labels, fontsize=5, rotation=90)
        fig.colorbar(image, ax=axes, shrink=min(1.0, 3 / n_layers), label="attention probability")
        fig.suptitle("attention: query (rows) -> key (columns)")
        fig.savefig(path)


def page(attention: np.ndarray, lens: dict) -> str:
    """The HTML page: a layer and head picker over a heatmap with token labels, and the logit lens table."""
    data = {**lens, "attention": np.round(attention.astype(np.float64), 4).tolist()}
    # "</" inside a <script> would end it early: JSON allows the escaped slash
    embedded = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    template = (Path(__file__).parent / "inspect_page.html").read_text(encoding="utf-8")
    return template.replace("/*DATA*/", embedded, 1)
