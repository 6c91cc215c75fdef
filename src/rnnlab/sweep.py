"""`rnnlab sweep`: the book's exercise grid, one change at a time from a base run, each under a time budget.

Every variant differs from the base (the book's run unless flags say otherwise) in one respect: sampling,
input encoding, activation, clipping, truncation of backpropagation, or cell. Each trains into its own
directory under OUT with the same seed; the results go to OUT/sweep.md (a markdown table), OUT/sweep.json
and OUT/sweep.png (held-out perplexity against training time, one curve per variant: every run gets the
same minutes, not the same epochs). A run that diverges (see train.py) is reported as diverged, with what
it reached before, never dropped.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Callable

from . import rundir
from . import train as training
from .config import DataConfig, ModelConfig, TrainConfig
from .errors import RnnlabError
from .fileio import atomic_write_text, dumps_json
from .plots import PLOT_MAX, save_png

FULL_BPTT = "full-epoch BPTT (no detach)"

# name -> (section, changes) applied to the base; FULL_BPTT is computed from the training split
VARIANTS: dict[str, dict[str, dict]] = {
    "base": {},
    "random sampling": {"train": {"sampling": "random"}},
    "learned embedding (32)": {"model": {"embed_size": 32}},
    "ReLU": {"model": {"activation": "relu"}},
    "no clipping": {"train": {"theta": 0.0}},
    FULL_BPTT: {},
    "GRU": {"model": {"cell": "gru"}},
    "LSTM": {"model": {"cell": "lstm"}},
}


def full_bptt_steps(train_tokens: int, batch_size: int) -> int:
    """num_steps that makes one minibatch of the whole epoch under sequential partitioning: backpropagation
    through all of it, one update per epoch. Any offset in [0, T] must still leave T tokens per stream."""
    return max((train_tokens - 1) // (batch_size + 1), 1)


def variant_configs(name: str, data: DataConfig, model: ModelConfig, train: TrainConfig, train_tokens: int):
    changes = VARIANTS[name]
    model = dataclasses.replace(model, **changes.get("model", {}))
    train = dataclasses.replace(train, **changes.get("train", {}))
    if name == FULL_BPTT:
        train = dataclasses.replace(train, sampling="sequential",
                                    num_steps=full_bptt_steps(train_tokens, train.batch_size))
    return data, model, train


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_variant(name: str, data: DataConfig, model: ModelConfig, train: TrainConfig, out: Path,
                train_tokens: int, overwrite: bool = False) -> dict:
    data, model, train = variant_configs(name, data, model, train, train_tokens)
    run = training.new_run(data, model, train)
    status = "ok"
    try:
        training.fit(run, out / slug(name), log=lambda line: None, progress=False, overwrite=overwrite)
    except training.Diverged:
        status = f"diverged in epoch {run.epoch + 1}"
    if run.rollbacks and status == "ok":
        status = f"ok after {run.rollbacks} rollback{'s' if run.rollbacks > 1 else ''}"
    records = run.records
    last = records[-1] if records else {}
    finite_vals = [r["val_ppl"] for r in records if r.get("val_ppl") is not None]
    return {"variant": name, "status": status, "epochs": run.epoch, "num_steps": train.num_steps,
            "val_ppl": last.get("val_ppl"), "val_bits_per_token": last.get("val_bits_per_token"),
            "best_val_ppl": min(finite_vals) if finite_vals else None, "train_ppl": last.get("train_ppl"),
            "tokens_per_s": _median([r["tokens_per_s"] for r in records]), "wall_s": round(run.elapsed_s, 1),
            "curve": [(r["epoch"], r["elapsed_s"], r["val_ppl"]) for r in records]}


def _median(xs: list[float]):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(rows: list[dict], data: DataConfig, budget: float) -> str:
    unit = "bits/char" if data.token == "char" else "bits/token"
    lines = [f"Held-out = last {data.val_fraction:.0%} of {data.corpus}; budget {budget:g} min per run.", "",
             f"| variant | held-out ppl (last) | {unit} | best held-out ppl | train ppl | tokens/s | wall s "
             "| epochs | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {_fmt(r['val_ppl'], '.2f')} | {_fmt(r['val_bits_per_token'], '.3f')} "
                     f"| {_fmt(r['best_val_ppl'], '.2f')} | {_fmt(r['train_ppl'], '.3f')} "
                     f"| {_fmt(r['tokens_per_s'], ',.0f')} | {r['wall_s']:.0f} | {r['epochs']} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Held-out perplexity against wall-clock minutes (log scale), one line per variant, written atomically."""
    from matplotlib.figure import Figure   # a bare Figure draws with Agg and leaves pyplot's backend alone
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for r in rows:
        points = [(s / 60, v) for _, s, v in r["curve"] if v is not None and math.isfinite(v) and v < PLOT_MAX]
        if points:
            label = r["variant"] + ("" if r["status"].startswith("ok") else " (diverged)")
            ax.plot(*zip(*points), marker=".", label=label)
    ax.set_yscale("log")
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        plain = ScalarFormatter()                  # 4, 6, 10, 20 rather than 2 x 10^1
        plain.set_scientific(False)
        set_formatter(plain)
    ax.set_xlabel("training time (minutes, evaluation included)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    save_png(fig, path)


def sweep(data: DataConfig, model: ModelConfig, train: TrainConfig, out, budget: float,
          names=tuple(VARIANTS), log: Callable[[str], None] = print, overwrite: bool = False) -> list[dict]:
    """Run the named variants of the base configs, each for up to `budget` minutes, and write the table,
    the JSON and the plot into `out` (rewritten after every run, so a partial sweep is readable).

    `out` is locked while the sweep runs. One that already holds anything is refused unless `overwrite`
    is given; then each variant replaces its own earlier run (only rnnlab's files are touched)."""
    out = Path(out)
    for name in names:
        if name not in VARIANTS:
            raise RnnlabError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if out.exists() and not out.is_dir():
        raise RnnlabError(f"--out {out} exists and is not a directory")
    held = rundir.lock(out)
    try:
        existing = sorted(e.name for e in out.iterdir() if e.name != rundir.LOCK_FILE)
        if existing and not overwrite:
            shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
            raise RnnlabError(f"--out {out} is not empty (it holds {shown}); pass --overwrite to replace the "
                              "sweep's runs there, or choose another --out")
        return _sweep(data, model, train, out, budget, names, log, overwrite)
    finally:
        held.release()


def _sweep(data, model, train, out: Path, budget, names, log, overwrite) -> list[dict]:
    train = dataclasses.replace(train, time_budget=budget)
    train_tokens = len(training.load_dataset(data).train)
    rows = []
    for name in names:
        rows.append(run_variant(name, data, model, train, out, train_tokens, overwrite))
        r = rows[-1]
        log(f"{name:<28} held-out ppl {_fmt(r['val_ppl'], '.2f'):>8}  train ppl {_fmt(r['train_ppl'], '.3f'):>8}"
            f"  {r['epochs']} epochs, {r['wall_s']:.0f} s  {r['status']}")
        atomic_write_text(out / "sweep.md", markdown(rows, data, budget))
        atomic_write_text(out / "sweep.json", dumps_json(rows, indent=1))
        try:
            plot(rows, out / "sweep.png")
        except Exception as e:                  # noqa: BLE001 (a plot is never worth the sweep)
            log(f"could not draw sweep.png ({type(e).__name__}); the table and the JSON are written")
    return rows
