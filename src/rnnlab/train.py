"""The training loop: the book's epoch with its state handling, evaluation cadence, divergence and rollback.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

One epoch is the book's `train_epoch_ch8`: for each (X, Y) minibatch, a fresh zero state at the start of the
epoch and, when the state is reset (`--state reset`, or random sampling), before every minibatch; otherwise
the previous minibatch's final state, detached; mean cross-entropy over the T*B predictions; gradients
clipped (global norm theta, the book's, or per element); an update (SGD, the book's, or momentum / Adam /
AdamW at the scheduled learning rate). Dropout masks are drawn from the run's data-order generator. Train
perplexity is exp of the token-weighted mean loss over the epoch.

Every `log_every` epochs, or every `eval_every` epochs or minibatch steps (mid-epoch too), and at the last,
the held-out split is scored as one stream, samples are drawn (both with the running average of the weights
under --ema, `averaged_weights`), and, with an output directory, metrics.jsonl, the checkpoint and the plot
are rewritten atomically (rundir.py: one writer, no links, nothing but rnnlab's files); a held-out loss
better than every earlier one also writes OUT/best. `save_every` adds checkpoints between evaluations. A
checkpoint taken mid-epoch holds where the epoch stands (runstate.Position) and resumes exactly. With
`patience`, training stops after that many evaluations without a better held-out loss. Ctrl-C stops at the
end of the current minibatch and checkpoints it. The run's state and how it is resumed are in runstate.py.

Divergence: a loss or gradient norm that is not finite, weights or optimizer buffers that are not, or an
epoch's loss more than ln V above its running level (ln V nats is what guessing uniformly costs) stop the
run before anything is saved, so the checkpoint on disk is always the last good one. With
`on_divergence="rollback"` the run instead goes back to that last good state, halves its learning rate and
continues (at most MAX_ROLLBACKS times); each rollback is recorded in the next metrics record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import checkpoint, distributed, evaluate, network, optim, rundir, samplers
from .config import TrainConfig, eval_cadence, every, resets_state
from .errors import Diverged, RnnlabError
from .fileio import finite_or_none
from .lm import LM
from .runstate import EpochStats, Position, Run, _check_trainable, fingerprint, make_checkpoint, restore
from .rundir import read_metrics  # noqa: F401  (the library's entry points, used via train)
from .runstate import load_dataset, new_run, resume_run, start_from  # noqa: F401

MAX_ROLLBACKS = 5
ROLLBACK_LR_FACTOR = 0.5


def learning_rate(cfg: TrainConfig, epoch: float) -> float:
    """The scheduled learning rate of the update that completes `epoch` (fractional) epochs."""
    return optim.lr_at(cfg.lr, epoch, cfg.num_epochs, cfg.schedule, cfg.warmup_epochs, cfg.lr_step_size,
                       cfg.lr_gamma)


def batches_per_epoch(num_tokens: int, cfg: TrainConfig) -> int:
    """samplers.batches_per_epoch for a run's batch size and steps."""
    return samplers.batches_per_epoch(num_tokens, cfg.batch_size, cfg.num_steps)


def epoch_steps(backend, corpus: np.ndarray, cfg: TrainConfig, rng: np.random.Generator,
                optimizer: optim.Optimizer, epoch: int, position: Position, dropout: float = 0.0,
                weight_drop: float = 0.0, lr_scale: float = 1.0,
                world: distributed.World = distributed.ALONE, locked_dropout: bool = False) -> Iterator[EpochStats]:
    """Train the minibatches of one epoch from `position` on (the book's `train_epoch_ch8`), advancing
    `position` and yielding each minibatch's own totals after its update; `epoch` counts the epochs done
    before this one, for the schedule.

    The sampler draws this epoch's offset and order from `rng` as it stood when the epoch began
    (`position.epoch_rng_state`); a position part-way through (a mid-epoch checkpoint) skips the minibatches
    already trained and goes on with `rng` as it is now, so a resumed epoch draws exactly the minibatches and
    masks an uninterrupted one would. Raises Diverged as soon as a loss or gradient norm is not finite.

    With several ranks (`world`), every rank draws the whole minibatch and its masks and trains its own rows;
    the loss and gradients are the ranks' mean before clipping (distributed.py), and the totals count all B
    rows."""
    stats, reset = position.stats, resets_state(cfg)
    arch = getattr(backend, "arch", None)
    dtype = np.dtype(cfg.dtype)
    per_epoch = batches_per_epoch(len(corpus), cfg)
    now = rng.bit_generator.state
    rng.bit_generator.state = position.epoch_rng_state
    minibatches = samplers.batches(corpus, cfg.batch_size, cfg.num_steps, cfg.sampling, rng)
    if position.batch:
        minibatches = itertools.islice(minibatches, position.batch, None)
        rng.bit_generator.state = now
    rows, num_targets = world.rows(cfg.batch_size), cfg.batch_size * cfg.num_steps
    start = time.perf_counter()
    for X, Y in minibatches:
        masks = network.dropout_masks(rng, dropout, arch.num_layers, *X.shape, arch.num_hiddens, dtype,
                                      locked_dropout) if dropout else None               # (L, T, B, H)
        weight_masks = network.weight_drop_masks(rng, weight_drop, arch, dtype) if weight_drop else None
        if world.distributed:                                    # this rank's rows: (B/N, T), (L, T, B/N, H)
            X, Y, masks = X[rows], Y[rows], None if masks is None else masks[:, :, rows]
        if position.state is None or reset:
            position.state = backend.begin_state(X.shape[0])
        loss, grads, state = backend.loss_and_grads(X, Y, position.state, masks, weight_masks)   # detached
        loss, grads = world.mean(loss, grads)                    # the mean over all B rows
        grads, norm, clipped = optim.clip(grads, cfg.theta, cfg.clip_mode)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise Diverged(f"the {'loss' if not math.isfinite(loss) else 'gradient'} is not finite in "
                           f"minibatch {position.batch + 1}")
        lr = lr_scale * learning_rate(cfg, epoch + min((position.batch + 1) / per_epoch, 1.0))
        backend.update(lambda params: optimizer.step(params, grads, lr))
        position.state = state
        position.batch += 1
        step = EpochStats(loss * num_targets, num_targets, time.perf_counter() - start, 1, int(clipped))
        stats.add(step)
        yield step
        start = time.perf_counter()


def train_epoch(backend, corpus: np.ndarray, cfg: TrainConfig, rng: np.random.Generator,
                optimizer: optim.Optimizer | None = None, epoch: int = 0, dropout: float = 0.0,
                weight_drop: float = 0.0, lr_scale: float = 1.0, locked_dropout: bool = False) -> EpochStats:
    """One whole pass over the training split (the book's `train_epoch_ch8`) from a fresh zero state; without
    an optimizer, the book's SGD. Dropout and weight-drop masks come from `rng`."""
    position = Position(rng.bit_generator.state)
    for _ in epoch_steps(backend, corpus, cfg, rng, optimizer or optim.Optimizer(), epoch, position, dropout,
                         weight_drop, lr_scale, locked_dropout=locked_dropout):
        pass
    return position.stats


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
    """One continuation of each configured prompt, decoded as `rnnlab generate` decodes by default: greedy
    for the book's model (its `predict_ch8`), sampled from the run's seed for any other. The data-order RNG
    is not touched, so drawing samples never changes training."""
    model = LM(run.backend, run.dataset.vocab, run.data_cfg, run.model_cfg, run.train_cfg)
    options = model.options(num_preds=run.train_cfg.num_preds, seed=run.train_cfg.seed)
    out = {}
    for prefix in run.train_cfg.prefixes:
        try:
            prompt = model.prompt(prefix)
        except RnnlabError:                  # nothing left once normalised ("?!" under the book's rules)
            continue
        out[prefix] = model.generate(prompt, options)[0]
    return out


def progress(run: Run) -> float:
    """Epochs done, with the fraction of the current one (what the schedule and the records count in)."""
    done = run.position.batch if run.position is not None else 0
    return run.epoch + min(done / batches_per_epoch(len(run.dataset.train), run.train_cfg), 1.0)


def make_record(run: Run, epoch: EpochStats, window: EpochStats, val: dict, sample_text: dict) -> dict:
    """One metrics.jsonl line: train ppl of the latest epoch (so far, when taken mid-epoch); speed and
    clipping over the steps since the previous record, training time only; where the run is (epochs done,
    global step, fractional epochs); how the held-out figure was scored (`evaluate.scoring`: one stream or
    pieces, warm-up, matmul dtype, the split's size); the exact path that trained (numpy, torch-fused, ...);
    the rollbacks and the settings changed on resuming since then, if any."""
    bits = val["bits_per_token"]
    record = {"epoch": run.epoch, "step": run.step, "progress": round(progress(run), 6),
              "train_ppl": finite_or_none(epoch.ppl), "val_ppl": finite_or_none(val["perplexity"]),
              "val_bpc": finite_or_none(bits) if run.data_cfg.token == "char" else None,
              "val_bits_per_token": finite_or_none(bits), "val_tokens": val["tokens"],
              "val_scoring": val.get("scoring"),
              "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
              "lr": run.lr_scale * learning_rate(run.train_cfg, progress(run)),
              "clip_frac": window.clipped / max(window.steps, 1), "elapsed_s": round(run.elapsed_s, 3),
              "backend": run.backend.name, "samples": sample_text}
    rollbacks = [e for e in run.events if "setting" not in e]
    changes = [e for e in run.events if "setting" in e]
    if rollbacks:
        record["rollbacks"] = rollbacks
    if changes:
        record["changes"] = changes
    run.events = []
    return record


def num(x, fmt: str) -> str:
    """A metric for display; None stands for a value that overflowed (an infinite perplexity). Values too
    large for fixed-point notation are shown in scientific notation rather than with hundreds of digits."""
    if x is None or not math.isfinite(x):
        return "inf"
    return format(x, fmt) if abs(x) < 1e6 else format(x, ".3e")


def format_record(r: dict) -> str:
    """The one log line per evaluation: at an epoch's end 'epoch 10', mid-epoch 'epoch 10.37'."""
    at = f"{r['progress']:.2f}" if r.get("progress", r["epoch"]) != r["epoch"] else str(r["epoch"])
    line = (f"epoch {at:>4}  train ppl {num(r['train_ppl'], '.3f')}  val ppl {num(r['val_ppl'], '.2f')}"
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
                       "back_to_step": run.step, "lr_scale": run.lr_scale})
    log(f"diverged in epoch {diverged_in} ({reason}); back to {run.where()} with the learning rate "
        f"x{run.lr_scale:g}")


def saved_where(writer) -> str | None:
    """Where the checkpoint a writer last wrote (or resumed from) stands, or None when there is none."""
    if writer is None or writer.saved_epoch is None:
        return None
    step = f", step {writer.saved_step}" if writer.saved_step is not None else ""
    return f"epoch {writer.saved_epoch}{step}"


def _stop_message(run: Run, reason: str, writer) -> str:
    where = saved_where(writer)
    kept = f"the checkpoint in {writer.out} stays at {where}" if where else "nothing was saved"
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


class StopRequest:
    """Ctrl-C while `fit` runs: the first one asks the loop to save the current step and stop; a second one
    interrupts at once (KeyboardInterrupt), leaving the last checkpoint as it was."""

    def __init__(self, log: Callable[[str], None]):
        self.requested, self._log, self._previous = False, log, None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("stopping after this minibatch to save it (Ctrl-C again to stop at once, unsaved)")

    def __enter__(self) -> "StopRequest":
        # outside the main thread no handler can be set; a process told to ignore Ctrl-C (started in the
        # background by a shell, say) keeps ignoring it, as Python itself does
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Interrupted(KeyboardInterrupt):
    """Training stopped at a minibatch's end on Ctrl-C; `saved` says whether that step was checkpointed."""

    def __init__(self, saved: bool):
        super().__init__("interrupted")
        self.saved = saved


def fit(run: Run, out=None, log: Callable[[str], None] | None = None, progress: bool = True,
        overwrite: bool = False, stop_at_step: int | None = None) -> list[dict]:
    """Train up to `run.train_cfg.num_epochs`, evaluating, logging and checkpointing at the configured cadence.

    `log` receives one line per evaluation (default: printed above the progress bar). `out` is a run
    directory, locked for the whole call (`overwrite` lets a new run replace the one there, at its first
    save), or a RunWriter already opened by `open_writer`, which the caller closes. `stop_at_step` stops
    after that many minibatch updates in all (mid-epoch if need be) and checkpoints there. Ctrl-C stops at
    the end of the current minibatch, checkpoints it (with a run directory) and raises Interrupted.
    """
    from tqdm.auto import tqdm
    if not run.world.main:                          # rank 0 writes the run directory and speaks for all
        out, log = None, (lambda line: None)
    log = log or tqdm.write
    progress = progress and run.world.main
    cfg = run.train_cfg
    _check_trainable(run.dataset, cfg)
    if run.world.distributed:
        run.world.same(fingerprint(run))       # every rank the same run, or every rank stops here
    owned = out is not None and not isinstance(out, rundir.RunWriter)
    writer = open_writer(run, out, overwrite) if owned else out
    run.writer = writer
    per_epoch = batches_per_epoch(len(run.dataset.train), cfg)
    bar = tqdm(total=cfg.num_epochs * per_epoch, initial=min(run.step, cfg.num_epochs * per_epoch), unit="step",
               disable=not progress or None, leave=False, dynamic_ncols=True, smoothing=0.1)
    try:
        if _used_budget(run, log):
            return run.records
        with StopRequest(log) as stop:
            _loop(run, writer, log, bar, stop, stop_at_step)
    finally:
        bar.close()
        if writer is not None:
            run.out, run.saved_epoch, run.saved_step = writer.out, writer.saved_epoch, writer.saved_step
            if owned:
                writer.close()
    return run.records


def _used_budget(run: Run, log: Callable[[str], None]) -> bool:
    """Whether the run already used its time budget (a resumed run that stopped on it): then say so, and how
    to give it more, instead of training one more epoch."""
    budget = run.train_cfg.time_budget
    if budget <= 0 or run.elapsed_s / 60 < budget or run.epoch >= run.train_cfg.num_epochs:
        return False
    log(f"this run has already used its time budget ({run.elapsed_s / 60:.1f} of {budget:g} min); nothing "
        f"to train: give a larger --time-budget (minutes in all, this run's {run.elapsed_s / 60:.1f} included) "
        "or 0 for none")
    return True


@dataclass
class _Clock:
    """The run's wall time: what earlier sessions took plus this session's."""
    before: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def out_of(self, budget_minutes: float) -> bool:
        """Whether a time budget (0: none) is used up."""
        return budget_minutes > 0 and self.elapsed() / 60 >= budget_minutes


def _due(count: int, cadence: tuple[int, str] | None, unit: str) -> bool:
    """Whether a cadence (n, 'epoch'|'step') falls on `count` of `unit`."""
    return cadence is not None and cadence[1] == unit and count % cadence[0] == 0


def _loop(run: Run, writer, log: Callable[[str], None], bar, stop: StopRequest,
          stop_at_step: int | None = None) -> None:
    cfg = run.train_cfg
    evals, saves = eval_cadence(cfg), every(cfg.save_every, "--save-every")
    window = EpochStats()       # training since the last record: tokens/s and clipping of the interval
    clock = _Clock(run.elapsed_s)
    rollback = cfg.on_divergence == "rollback"
    last_good = make_checkpoint(run) if rollback else None     # what a rollback returns to
    if run.train_cfg.torch_impl == "compile" and "compile" in run.backend.name and run.step == 0:
        log("compiling the training step with torch.compile: the first minibatch takes a minute or more")

    def checkpoint_now(evaluate_too: bool, last: bool = False) -> None:
        """Evaluate (and log) or only checkpoint the state just reached, once the divergence check passed."""
        nonlocal last_good, window
        reason = divergence(run, stats_so_far())
        if reason is not None:
            raise Diverged(reason)
        run.elapsed_s = clock.elapsed()
        improved = False
        if evaluate_too:
            improved = _evaluate(run, stats_so_far(), window, log, last)
            window = EpochStats()
        if writer is not None or rollback or run.world.distributed:    # every rank: the state is gathered
            last_good = make_checkpoint(run)
        if writer is not None:
            writer.save(last_good, run.records, best=improved)
            if evaluate_too:
                _plot(run, writer.plot_path, log)

    def stats_so_far() -> EpochStats:
        return run.position.stats if run.position is not None else stats

    stats = EpochStats()
    while run.epoch < cfg.num_epochs:
        if run.position is None:
            run.position = Position(run.rng.bit_generator.state)
        try:
            with np.errstate(over="ignore", invalid="ignore"):   # divergence is caught just below
                position = run.position
                for step in epoch_steps(run.backend, run.dataset.train, cfg, run.rng, run.optimizer, run.epoch,
                                        position, run.model_cfg.dropout, run.model_cfg.weight_drop, run.lr_scale,
                                        run.world, run.model_cfg.dropout_mode == "locked"):
                    run.step += 1
                    window.add(step)
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {run.epoch + 1}/{cfg.num_epochs}  ppl {position.stats.ppl:.3f}  "
                                        f"{position.stats.tokens / max(position.stats.seconds, 1e-9):,.0f} tok/s",
                                        refresh=False)
                    due_eval = _due(run.step, evals, "step")
                    out_of_time, stopping = run.world.any(clock.out_of(cfg.time_budget), stop.requested)
                    if due_eval or out_of_time:
                        checkpoint_now(evaluate_too=True, last=out_of_time)
                    elif stopping or _due(run.step, saves, "step") or run.step == stop_at_step:
                        checkpoint_now(evaluate_too=False)
                    if stopping:
                        raise Interrupted(saved=writer is not None)
                    if out_of_time or run.step == stop_at_step:
                        if out_of_time:
                            log(f"time budget of {cfg.time_budget:g} min reached at {run.where()}")
                        return
                stats = position.stats
                reason = divergence(run, stats)
        except Diverged as e:
            reason = str(e)
        if reason is not None:
            if not rollback:
                raise Diverged(_stop_message(run, reason, writer))
            roll_back(run, last_good, reason, log)
            bar.n = run.step
            window = EpochStats()
            continue
        run.epoch += 1
        run.position = None
        run.loss_level = min(run.loss_level, stats.nll_sum / max(stats.tokens, 1))
        out_of_time, = run.world.any(clock.out_of(cfg.time_budget))
        if _due(run.epoch, evals, "epoch") or run.epoch == cfg.num_epochs or out_of_time:
            checkpoint_now(evaluate_too=True, last=out_of_time or run.epoch == cfg.num_epochs)
            patience_used, = run.world.any(bool(cfg.patience) and run.evals_since_best >= cfg.patience)
            if patience_used:
                log(f"early stop at epoch {run.epoch}: no better held-out loss in {cfg.patience} "
                    f"evaluations (best {math.exp(run.best_val_nats):.3f} ppl, kept in {rundir.BEST_DIR}/)")
                break
            if out_of_time:
                log(f"time budget of {cfg.time_budget:g} min reached at epoch {run.epoch}")
                break
        elif _due(run.epoch, saves, "epoch"):
            checkpoint_now(evaluate_too=False)


@contextlib.contextmanager
def averaged_weights(run: Run):
    """Inside the block the backend holds the weights a run is judged by: with --ema, the optimizer's
    average of them (copies of the trained weights are put back afterwards, since a backend may copy an
    update into its own storage); without, the trained weights as they are."""
    if not (run.optimizer.ema and run.optimizer.t):
        yield
        return
    trained = {name: optim.copy(p) for name, p in run.backend.params.items()}
    run.backend.update(run.optimizer.averaged)
    try:
        yield
    finally:
        run.backend.update(lambda params: trained)


def _evaluate(run: Run, stats: EpochStats, window: EpochStats, log: Callable[[str], None],
              last: bool = False) -> bool:
    """Score the held-out split (all of it at the run's `last` evaluation, else at most --val-max-tokens), draw
    the samples that are due, append and log a record; whether the held-out loss is the best so far."""
    cfg = run.train_cfg
    at_boundary = run.position is None
    due = (not cfg.sample_every or (at_boundary and run.epoch % cfg.sample_every == 0)
           or run.epoch == cfg.num_epochs)
    with averaged_weights(run):
        val = evaluate.score_heldout(run.backend, run.dataset.val, cfg, last)
        sample_text = samples(run) if due and run.world.main else {}
    compared = val.pop("compared_nats", val["nats_per_token"])      # with --val-max-tokens: the capped part
    improved = compared < run.best_val_nats
    if improved:
        run.best_val_nats, run.evals_since_best = compared, 0
    else:
        run.evals_since_best += 1
    run.records.append(make_record(run, stats, window, val, sample_text))
    log(format_record(run.records[-1]))
    return improved
