"""The training loop: the book's epoch with its state handling, evaluation cadence, divergence and rollback.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

One epoch is the book's `train_epoch_ch8`: for each (X, Y) minibatch, a fresh zero state at the start of the
epoch and, when the state is reset (`--state reset`, or random sampling), before every minibatch; otherwise
the previous minibatch's final state, detached; mean cross-entropy over the T*B predictions; gradients
clipped (global norm theta, the book's, or per element); an update (SGD, the book's, or momentum / Adam /
AdamW at the scheduled learning rate). Dropout masks are drawn from the run's data-order generator. Train
perplexity is exp of the token-weighted mean loss over the epoch.

Every `log_every` epochs (and at the last) the held-out split is scored as one stream, greedy samples are
drawn, and, with an output directory, metrics.jsonl, the checkpoint and the plot are rewritten atomically
(rundir.py: one writer, no links, nothing but rnnlab's files); a held-out loss better than every earlier one
also writes OUT/best. With `patience`, training stops after that many evaluations without a better held-out
loss. The run's state and how it is resumed are in runstate.py.

Divergence: a loss or gradient norm that is not finite, weights or optimizer buffers that are not, or an
epoch's loss more than ln V above its running level (ln V nats is what guessing uniformly costs) stop the
run before anything is saved, so the checkpoint on disk is always the last good one. With
`on_divergence="rollback"` the run instead goes back to that last good state, halves its learning rate and
continues (at most MAX_ROLLBACKS times); each rollback is recorded in the next metrics record.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import checkpoint, evaluate, generate, network, optim, rundir, samplers, text
from .config import TrainConfig, resets_state
from .errors import Diverged, RnnlabError
from .fileio import finite_or_none
from .runstate import Run, _check_trainable, make_checkpoint, restore
from .rundir import read_metrics  # noqa: F401  (the library's entry points, used via train)
from .runstate import load_dataset, new_run, resume_run  # noqa: F401

MAX_ROLLBACKS = 5
ROLLBACK_LR_FACTOR = 0.5


@dataclass
class EpochStats:
    nll_sum: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    clipped: int = 0

    def add(self, other: "EpochStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def ppl(self) -> float:
        nats = self.nll_sum / max(self.tokens, 1)
        return math.exp(nats) if nats < 700 else math.inf


def learning_rate(cfg: TrainConfig, epoch: float) -> float:
    """The scheduled learning rate of the update that completes `epoch` (fractional) epochs."""
    return optim.lr_at(cfg.lr, epoch, cfg.num_epochs, cfg.schedule, cfg.warmup_epochs, cfg.lr_step_size,
                       cfg.lr_gamma)


def train_epoch(backend, corpus: np.ndarray, cfg: TrainConfig, rng: np.random.Generator,
                optimizer: optim.Optimizer | None = None, epoch: int = 0, dropout: float = 0.0,
                weight_drop: float = 0.0, lr_scale: float = 1.0) -> EpochStats:
    """One pass over the training split (the book's `train_epoch_ch8`); `epoch` counts the epochs done
    before this one, for the learning-rate schedule. Without an optimizer, the book's SGD. Dropout and
    weight-drop masks come from `rng`, so a resumed run draws the same ones. Raises Diverged as soon as a
    minibatch's loss or gradient norm is not finite."""
    stats, state, reset = EpochStats(), None, resets_state(cfg)
    optimizer = optimizer or optim.Optimizer()
    arch = getattr(backend, "arch", None)
    dtype = np.dtype(cfg.dtype)
    approx_batches = max((len(corpus) - 1) // (cfg.batch_size * cfg.num_steps), 1)
    start = time.perf_counter()
    for X, Y in samplers.batches(corpus, cfg.batch_size, cfg.num_steps, cfg.sampling, rng):
        if state is None or reset:
            state = backend.begin_state(X.shape[0])
        masks = network.dropout_masks(rng, dropout, arch.num_layers, *X.shape, arch.num_hiddens,
                                      dtype) if dropout else None
        weight_masks = network.weight_drop_masks(rng, weight_drop, arch, dtype) if weight_drop else None
        loss, grads, state = backend.loss_and_grads(X, Y, state, masks, weight_masks)   # state detached
        grads, norm, clipped = optim.clip(grads, cfg.theta, cfg.clip_mode)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise Diverged(f"the {'loss' if not math.isfinite(loss) else 'gradient'} is not finite in "
                           f"minibatch {stats.steps + 1}")
        progress = epoch + min((stats.steps + 1) / approx_batches, 1.0)
        lr = lr_scale * learning_rate(cfg, progress)
        backend.update(lambda params: optimizer.step(params, grads, lr))
        stats.nll_sum += loss * Y.size
        stats.tokens += Y.size
        stats.steps += 1
        stats.clipped += clipped
    stats.seconds = time.perf_counter() - start
    return stats


def divergence(run: Run, stats: EpochStats) -> str | None:
    """Why the epoch just trained counts as diverged, or None: weights or optimizer buffers that are not
    finite, or a loss more than ln V above the lowest epoch loss so far (or above 2 ln V at first)."""
    if not optim.all_finite(run.backend.params):
        return "the weights are not finite"
    if not optim.all_finite(run.optimizer.buffer_arrays()):
        return "the optimizer's running averages are not finite"
    nats, log_v = stats.nll_sum / max(stats.tokens, 1), math.log(len(run.dataset.vocab))
    level = min(run.loss_level, log_v)
    if not nats <= level + log_v:
        return f"the loss ({nats:.4g} nats/token) is far above its running level ({level:.4g})"
    return None


def samples(run: Run) -> dict[str, str]:
    """Greedy continuations of the configured prefixes (the book prints these while training)."""
    joiner = "" if run.data_cfg.token == "char" else " "
    out = {}
    for prefix in run.train_cfg.prefixes:
        tokens = text.tokenize(text.normalize_prefix(prefix, run.data_cfg.preprocess), run.data_cfg.token)
        if len(tokens):
            out[prefix] = generate.predict(run.backend, run.dataset.vocab, tokens, run.train_cfg.num_preds,
                                           joiner=joiner)[0]
    return out


def make_record(run: Run, epoch: EpochStats, window: EpochStats, val: dict, sample_text: dict) -> dict:
    """One metrics.jsonl line: train ppl of the latest epoch; speed and clipping over the epochs since the
    previous record, training time only; the exact path that trained (numpy, torch-fused, ...); the
    rollbacks since then, if any."""
    bits = val["bits_per_token"]
    record = {"epoch": run.epoch, "train_ppl": finite_or_none(epoch.ppl), "val_ppl": finite_or_none(val["perplexity"]),
              "val_bpc": finite_or_none(bits) if run.data_cfg.token == "char" else None,
              "val_bits_per_token": finite_or_none(bits), "val_tokens": val["tokens"],
              "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
              "lr": run.lr_scale * learning_rate(run.train_cfg, run.epoch),
              "clip_frac": window.clipped / max(window.steps, 1), "elapsed_s": round(run.elapsed_s, 3),
              "backend": run.backend.name, "samples": sample_text}
    if run.events:
        record["rollbacks"], run.events = run.events, []
    return record


def num(x, fmt: str) -> str:
    """A metric for display; None stands for a value that overflowed (an infinite perplexity). Values too
    large for fixed-point notation are shown in scientific notation rather than with hundreds of digits."""
    if x is None or not math.isfinite(x):
        return "inf"
    return format(x, fmt) if abs(x) < 1e6 else format(x, ".3e")


def format_record(r: dict) -> str:
    """The one log line per logged epoch."""
    line = (f"epoch {r['epoch']:>4}  train ppl {num(r['train_ppl'], '.3f')}  val ppl {num(r['val_ppl'], '.2f')}"
            f"  val {num(r['val_bits_per_token'], '.3f')} bits/tok  {r['tokens_per_s'] / 1e3:.1f}K tok/s")
    return line + "".join(f"  | {s!r}" for s in r["samples"].values())


def roll_back(run: Run, last_good: checkpoint.Checkpoint, reason: str, log: Callable[[str], None]) -> None:
    """Go back to the last good state with a smaller learning rate, or raise Diverged when the rollbacks
    are used up."""
    diverged_in = run.epoch + 1
    if run.rollbacks >= MAX_ROLLBACKS:
        raise Diverged(_stop_message(run, f"{reason}; after {run.rollbacks} rollbacks", run.writer))
    restore(run, last_good)
    run.rollbacks += 1
    run.lr_scale *= ROLLBACK_LR_FACTOR
    run.events.append({"diverged_in_epoch": diverged_in, "reason": reason, "back_to_epoch": run.epoch,
                       "lr_scale": run.lr_scale})
    log(f"diverged in epoch {diverged_in} ({reason}); back to epoch {run.epoch} with the learning rate "
        f"x{run.lr_scale:g}")


def _stop_message(run: Run, reason: str, writer) -> str:
    kept = (f"the checkpoint in {writer.out} stays at epoch {writer.saved_epoch}"
            if writer is not None and writer.saved_epoch is not None else "nothing was saved")
    rollback = "" if run.train_cfg.on_divergence == "rollback" else ", or --on-divergence rollback"
    return (f"training diverged in epoch {run.epoch + 1} ({reason}); {kept}; try a smaller --lr or clipping "
            f"(--clip){rollback}")


def _plot(run: Run, path: Path, log: Callable[[str], None]) -> None:
    """Redraw the perplexity plot. A plot is never worth a run: any failure is reported once and training
    goes on."""
    from .plots import plot_perplexity
    try:
        plot_perplexity(run.records, path, title=f"{run.data_cfg.corpus}: {run.model_cfg.cell}, "
                                                 f"H={run.model_cfg.num_hiddens}")
    except Exception as e:                      # noqa: BLE001 (matplotlib raises many kinds)
        if "plot" not in run.events_logged:
            run.events_logged.add("plot")
            log(f"could not draw {path.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "training goes on")


def open_writer(run: Run, out, overwrite: bool = False) -> rundir.RunWriter:
    """Lock and check the run directory `out` for `run` (see rundir.RunWriter); a resumed (or continued)
    run must find its own checkpoint there. Close it when done, or use it as a context manager."""
    out = Path(out)
    resume_epoch = run.saved_epoch if run.out is not None and run.out.resolve() == out.resolve() else None
    if resume_epoch is None and run.epoch > 0 and not overwrite and checkpoint.exists(out):
        raise RnnlabError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
                          "it, or choose another --out")
    writer = rundir.RunWriter(out, overwrite, resume_epoch)
    writer.open()
    return writer


def fit(run: Run, out=None, log: Callable[[str], None] | None = None, progress: bool = True,
        overwrite: bool = False) -> list[dict]:
    """Train up to `run.train_cfg.num_epochs`, evaluating, logging and checkpointing every `log_every`.

    `log` receives one line per logged epoch (default: printed above the progress bar). `out` is a run
    directory, locked for the whole call (`overwrite` lets a new run replace the one there, at its first
    save), or a RunWriter already opened by `open_writer`, which the caller closes.
    """
    from tqdm.auto import tqdm
    log = log or tqdm.write
    cfg = run.train_cfg
    _check_trainable(run.dataset, cfg)
    owned = out is not None and not isinstance(out, rundir.RunWriter)
    writer = open_writer(run, out, overwrite) if owned else out
    run.writer = writer
    bar = tqdm(total=cfg.num_epochs, initial=run.epoch, unit="epoch", disable=not progress or None,
               leave=False, dynamic_ncols=True)
    try:
        _loop(run, writer, log, bar)
    finally:
        bar.close()
        if writer is not None:
            run.out, run.saved_epoch = writer.out, writer.saved_epoch
            if owned:
                writer.close()
    return run.records


def _loop(run: Run, writer, log: Callable[[str], None], bar) -> None:
    cfg = run.train_cfg
    window = EpochStats()       # training since the last log: tokens/s and train ppl of the interval
    session_start, elapsed_before = time.perf_counter(), run.elapsed_s
    rollback = cfg.on_divergence == "rollback"
    last_good = make_checkpoint(run) if rollback else None     # what a rollback returns to
    while run.epoch < cfg.num_epochs:
        try:
            with np.errstate(over="ignore", invalid="ignore"):   # divergence is caught just below
                stats = train_epoch(run.backend, run.dataset.train, cfg, run.rng, run.optimizer, run.epoch,
                                    run.model_cfg.dropout, run.model_cfg.weight_drop, run.lr_scale)
                reason = divergence(run, stats)
        except Diverged as e:
            reason = str(e)
        if reason is not None:
            if not rollback:
                raise Diverged(_stop_message(run, reason, writer))
            roll_back(run, last_good, reason, log)
            bar.n = run.epoch
            window = EpochStats()
            continue
        run.epoch += 1
        run.loss_level = min(run.loss_level, stats.nll_sum / max(stats.tokens, 1))
        bar.update(1)
        bar.set_postfix(ppl=f"{stats.ppl:.3f}")
        window.add(stats)
        train_minutes = (elapsed_before + time.perf_counter() - session_start) / 60
        out_of_time = cfg.time_budget > 0 and train_minutes >= cfg.time_budget
        if run.epoch % cfg.log_every == 0 or run.epoch == cfg.num_epochs or out_of_time:
            val = evaluate.score_stream(run.backend, run.dataset.val)
            improved = val["nats_per_token"] < run.best_val_nats
            if improved:
                run.best_val_nats, run.evals_since_best = val["nats_per_token"], 0
            else:
                run.evals_since_best += 1
            run.elapsed_s = elapsed_before + time.perf_counter() - session_start
            due = not cfg.sample_every or run.epoch % cfg.sample_every == 0 or run.epoch == cfg.num_epochs
            run.records.append(make_record(run, stats, window, val, samples(run) if due else {}))
            log(format_record(run.records[-1]))
            if writer is not None or rollback:
                last_good = make_checkpoint(run)
            if writer is not None:
                writer.save(last_good, run.records, best=improved)
                _plot(run, writer.plot_path, log)
            window = EpochStats()
            if cfg.patience and run.evals_since_best >= cfg.patience:
                log(f"early stop at epoch {run.epoch}: no better held-out loss in {cfg.patience} "
                    f"evaluations (best {math.exp(run.best_val_nats):.3f} ppl, kept in {rundir.BEST_DIR}/)")
                break
            if out_of_time:
                log(f"time budget of {cfg.time_budget:g} min reached at epoch {run.epoch}")
                break
