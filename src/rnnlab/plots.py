"""Perplexity curves: train and held-out perplexity per logged epoch, drawn off-screen (Agg) to a PNG."""
from __future__ import annotations

import io
import math
from pathlib import Path

from .fileio import atomic_write_bytes


def plot_perplexity(records: list[dict], path, title: str = "") -> None:
    """Write a log-scale plot of `train_ppl` and `val_ppl` against epochs to `path` (atomically)."""
    from matplotlib.figure import Figure   # a bare Figure draws with Agg and leaves pyplot's backend alone

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    epochs = [r.get("progress", r["epoch"]) for r in records]       # fractional epochs for mid-epoch records
    ax.plot(epochs, plottable([r["train_ppl"] for r in records]), marker=".", label="train")
    ax.plot(epochs, plottable([r["val_ppl"] for r in records]), marker=".", label="held-out")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_title(plain_text(title), parse_math=False)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_png(fig, path)


PLOT_MAX = 1e100      # larger values (a diverging run) are left out: log-scale ticks overflow near 1e308


def plottable(values) -> list[float]:
    """Values as floats, with None, non-finite, non-positive and absurdly large ones as nan (not drawn)."""
    return [float(v) if v is not None and 0 < v < PLOT_MAX else math.nan for v in values]


def plain_text(text: str) -> str:
    """`text` with anything a font cannot draw (lone surrogates from undecodable file names) replaced."""
    return text.encode("utf-8", "replace").decode("utf-8")


def save_png(fig, path) -> None:
    """Lay out a matplotlib Figure and write it to `path` as a PNG, atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())
