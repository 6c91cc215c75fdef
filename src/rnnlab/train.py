"""The training run: data, the epoch loop with the book's state handling, evaluation cadence, run directory.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

One epoch is the book's `train_epoch_ch8`: for each (X, Y) minibatch, a fresh zero state when sampling is
random (or at the start of the epoch), otherwise the previous minibatch's final state, detached; mean
cross-entropy over the T*B predictions; gradients clipped (global norm theta, the book's, or per element);
an update (SGD, the book's, or momentum / Adam / AdamW at the scheduled learning rate). Dropout masks are
drawn from the run's data-order generator. Train perplexity is exp of the token-weighted mean loss over
the epoch.

Every `log_every` epochs (and at the last) the held-out split is scored as one stream, greedy samples are
drawn, and, with an output directory, metrics.jsonl, the checkpoint and the plot are rewritten atomically;
a held-out loss better than every earlier one also writes OUT/best. With `patience`, training stops after
that many evaluations without a better held-out loss.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import cells, checkpoint, corpora, evaluate, generate, network, optim, samplers, text
from .backends import make_backend
from .config import RUN_DEFINING, DataConfig, ModelConfig, TrainConfig, to_dict, validate_sizes
from .errors import RnnlabError
from .fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "perplexity.png"
BEST_DIR = "best"


@dataclass
class Dataset:
    """The encoded corpus split into its training part and its held-out part, with the vocabulary."""
    train: np.ndarray
    val: np.ndarray
    vocab: text.Vocab
    path: Path
    sha256: str


def load_dataset(cfg: DataConfig, vocab: text.Vocab | None = None) -> Dataset:
    """Read, preprocess, encode (with `vocab`, or one built over the whole text as the book does) and split."""
    raw, path, digest = corpora.load(cfg.corpus, cfg.data_dir)
    try:
        corpus, vocab = text.load_corpus(raw, cfg.preprocess, cfg.token, vocab=vocab)
    except RnnlabError as e:
        raise RnnlabError(f"{path}: {e}") from None
    train, val = evaluate.split(corpus, cfg.val_fraction, cfg.max_tokens)
    return Dataset(train, val, vocab, path, digest)


@dataclass
class Run:
    """Everything a training run carries from epoch to epoch (and through a checkpoint)."""
    data_cfg: DataConfig
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    dataset: Dataset
    backend: object
    rng: np.random.Generator          # data order: sampler offsets, shuffles and dropout masks
    optimizer: optim.Optimizer
    epoch: int = 0
    elapsed_s: float = 0.0            # wall time of all sessions of this run, evaluation included
    records: list[dict] = field(default_factory=list)
    best_val_nats: float = math.inf   # best held-out loss so far (nats per token)
    evals_since_best: int = 0         # evaluations since then, for early stopping


def _generators(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the initial weights and the data order, both from one seed."""
    init_seq, data_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(init_seq), np.random.default_rng(data_seq)


def _check_trainable(dataset: Dataset, cfg: TrainConfig) -> None:
    needed = samplers.min_tokens(cfg.batch_size, cfg.num_steps, cfg.sampling)
    if len(dataset.train) < needed:
        raise RnnlabError(
            f"training split has {len(dataset.train)} tokens; --batch-size {cfg.batch_size} x --num-steps "
            f"{cfg.num_steps} with {cfg.sampling} sampling needs at least {needed}")


def _backend(params, model_cfg: ModelConfig, train_cfg: TrainConfig):
    return make_backend(train_cfg.backend, params, model_cfg.activation, train_cfg.device,
                        torch_impl=train_cfg.torch_impl, matmul_dtype=train_cfg.matmul_dtype,
                        dropout=model_cfg.dropout)


def _optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.make_optimizer(cfg.optimizer, cfg.weight_decay, cfg.momentum)


def new_run(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> Run:
    """Load the data and initialise the parameters from the seed (the book's scheme by default)."""
    validate_sizes(data_cfg, model_cfg, train_cfg)
    dataset = load_dataset(data_cfg)
    _check_trainable(dataset, train_cfg)
    init_rng, data_rng = _generators(train_cfg.seed)
    params = cells.init_params(len(dataset.vocab), model_cfg.num_hiddens, init_rng, np.dtype(train_cfg.dtype),
                               model_cfg.cell, model_cfg.num_layers, model_cfg.embed_size, model_cfg.init)
    return Run(data_cfg, model_cfg, train_cfg, dataset, _backend(params, model_cfg, train_cfg), data_rng,
               _optimizer(train_cfg))


def resume_run(out, data: dict | None = None, model: dict | None = None, train: dict | None = None) -> Run:
    """Rebuild a run from the checkpoint in `out`.

    `data`, `model`, `train` hold settings given anew (e.g. {"num_epochs": 1000}). Those that do not alter
    what the run computes (num_epochs, log_every, backend, device, prefixes, num_preds, data_dir) are
    applied; one that would change the run (a size, the seed, the corpus, ...) is refused.
    """
    ckpt = checkpoint.load(out)
    data_cfg, model_cfg, train_cfg, vocab = checkpoint.read_configs(ckpt, out)
    changes = {"data": data or {}, "model": model or {}, "train": train or {}}
    saved = {"data": data_cfg, "model": model_cfg, "train": train_cfg}
    for section, given in changes.items():
        for name in RUN_DEFINING[section]:
            if name in given and given[name] != getattr(saved[section], name):
                raise RnnlabError(f"--{name.replace('_', '-')} differs from the checkpoint in {out}; a "
                                  "resumed run keeps its settings (start a new --out to change them)")
    data_cfg = dataclasses.replace(data_cfg, **changes["data"])
    train_cfg = dataclasses.replace(train_cfg, **changes["train"])
    validate_sizes(data_cfg, model_cfg, train_cfg)
    dataset = load_dataset(data_cfg, vocab)
    if ckpt.extra.get("corpus_sha256") not in (None, dataset.sha256):
        raise RnnlabError(f"the corpus file {dataset.path} changed since the checkpoint was written; "
                          "resuming would train on different data")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = ckpt.rng_state
    except (TypeError, ValueError, KeyError):
        raise RnnlabError(f"corrupt checkpoint {out}: bad RNG state") from None
    backend = _backend(ckpt.params, model_cfg, train_cfg)
    optimizer = _optimizer(train_cfg)
    try:
        optimizer.load_state_dict(ckpt.optimizer, ckpt.optimizer_arrays, backend.params)
    except (TypeError, ValueError) as e:
        raise RnnlabError(f"corrupt checkpoint {out}: {e}") from None
    records = [r for r in read_metrics(out) if r["epoch"] <= ckpt.epoch]
    best = ckpt.extra.get("best_val_nats")
    return Run(data_cfg, model_cfg, train_cfg, dataset, backend, rng, optimizer, ckpt.epoch,
               float(ckpt.extra.get("elapsed_s", 0.0)), records, math.inf if best is None else float(best),
               int(ckpt.extra.get("evals_since_best", 0)))


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
                weight_drop: float = 0.0) -> EpochStats:
    """One pass over the training split (the book's `train_epoch_ch8`); `epoch` counts the epochs done
    before this one, for the learning-rate schedule. Without an optimizer, the book's SGD. Dropout and
    weight-drop masks come from `rng`, so a resumed run draws the same ones."""
    stats, state = EpochStats(), None
    optimizer = optimizer or optim.Optimizer()
    arch = getattr(backend, "arch", None)
    dtype = np.dtype(cfg.dtype)
    approx_batches = max((len(corpus) - 1) // (cfg.batch_size * cfg.num_steps), 1)
    start = time.perf_counter()
    for X, Y in samplers.batches(corpus, cfg.batch_size, cfg.num_steps, cfg.sampling, rng):
        if state is None or cfg.sampling == "random":
            state = backend.begin_state(X.shape[0])
        masks = network.dropout_masks(rng, dropout, arch.num_layers, *X.shape, arch.num_hiddens,
                                      dtype) if dropout else None
        weight_masks = network.weight_drop_masks(rng, weight_drop, arch, dtype) if weight_drop else None
        loss, grads, state = loss_and_grads(backend, X, Y, state, masks, weight_masks)   # state detached
        _, clipped = optim.clip(grads, cfg.theta, cfg.clip_mode)
        progress = epoch + min((stats.steps + 1) / approx_batches, 1.0)
        optimizer.step(backend.params, grads, learning_rate(cfg, progress))
        stats.nll_sum += loss * Y.size
        stats.tokens += Y.size
        stats.steps += 1
        stats.clipped += clipped
    stats.seconds = time.perf_counter() - start
    return stats


def loss_and_grads(backend, X, Y, state, masks=None, weight_masks: dict | None = None):
    """`backend.loss_and_grads`, with the recurrent weights multiplied by `weight_masks` (weight drop) for
    this minibatch: the loss of W * M, and its gradient w.r.t. W, which is M * (gradient w.r.t. W * M).
    The weights are put back exactly afterwards, whatever happens."""
    if not weight_masks:
        return backend.loss_and_grads(X, Y, state, masks)
    params = backend.params
    masks_like = {name: optim.like(m, params[name]) for name, m in weight_masks.items()}
    kept = {name: optim.copy(params[name]) for name in masks_like}
    try:
        for name, m in masks_like.items():
            params[name] *= m
        loss, grads, state = backend.loss_and_grads(X, Y, state, masks)
    finally:
        for name, w in kept.items():
            params[name][...] = w
    for name, m in masks_like.items():
        grads[name] *= m
    return loss, grads, state


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


def _finite(x: float):
    return x if math.isfinite(x) else None


def make_record(run: Run, epoch: EpochStats, window: EpochStats, val: dict, sample_text: dict) -> dict:
    """One metrics.jsonl line: train ppl of the latest epoch; speed and clipping over the epochs since the
    previous record, training time only."""
    bits = val["bits_per_token"]
    return {"epoch": run.epoch, "train_ppl": _finite(epoch.ppl), "val_ppl": _finite(val["perplexity"]),
            "val_bpc": _finite(bits) if run.data_cfg.token == "char" else None,
            "val_bits_per_token": _finite(bits), "val_tokens": val["tokens"],
            "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
            "lr": learning_rate(run.train_cfg, run.epoch),
            "clip_frac": window.clipped / max(window.steps, 1), "elapsed_s": round(run.elapsed_s, 3),
            "samples": sample_text}


def num(x, fmt: str) -> str:
    """A metric for display; None stands for a value that overflowed (an infinite perplexity)."""
    return format(x, fmt) if x is not None else "inf"


def format_record(r: dict) -> str:
    """The one log line per logged epoch."""
    line = (f"epoch {r['epoch']:>4}  train ppl {num(r['train_ppl'], '.3f')}  val ppl {num(r['val_ppl'], '.2f')}"
            f"  val {num(r['val_bits_per_token'], '.3f')} bits/tok  {r['tokens_per_s'] / 1e3:.1f}K tok/s")
    return line + "".join(f"  | {s!r}" for s in r["samples"].values())


def read_metrics(out) -> list[dict]:
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RnnlabError(f"{path} is damaged ({e}); move it away to resume without the earlier metrics") \
            from None


def save_run(run: Run, out, best: bool = False) -> None:
    """Metrics, checkpoint and plot, each written atomically. Metrics go first: a crash between the two
    leaves metrics one record ahead, which resuming drops, rather than a checkpoint whose record is lost.
    With `best`, the same checkpoint is also written to OUT/best (the model early stopping keeps)."""
    from .plots import plot_perplexity
    out = Path(out)
    cfg = {"data": to_dict(run.data_cfg), "model": to_dict(run.model_cfg), "train": to_dict(run.train_cfg)}
    extra = {"corpus_path": str(run.dataset.path), "corpus_sha256": run.dataset.sha256,
             "train_tokens": len(run.dataset.train), "val_tokens": len(run.dataset.val),
             "backend": run.backend.name, "elapsed_s": run.elapsed_s,
             "metrics": run.records[-1] if run.records else None,
             "best_val_nats": _finite(run.best_val_nats), "evals_since_best": run.evals_since_best,
             "vocab_token_freqs": [list(tf) for tf in run.dataset.vocab.token_freqs]}
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in run.records))
    opt_meta, opt_arrays = run.optimizer.state_dict()
    ckpt = checkpoint.Checkpoint(
        params=run.backend.numpy_params(), config=cfg, vocab=run.dataset.vocab.idx_to_token, epoch=run.epoch,
        rng_state=run.rng.bit_generator.state, optimizer=opt_meta, extra=extra, optimizer_arrays=opt_arrays)
    checkpoint.save(out, ckpt)
    if best:
        checkpoint.save(out / BEST_DIR, ckpt)
    plot_perplexity(run.records, out / PLOT_FILE, title=f"{run.data_cfg.corpus}: {run.model_cfg.cell}, "
                                                        f"H={run.model_cfg.num_hiddens}")


def prepare_out(out, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; with `overwrite`, remove only rnnlab's own files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RnnlabError(f"--out {out} exists and is not a directory")
    if checkpoint.exists(out):
        if not overwrite:
            raise RnnlabError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                              "replace it, or choose another --out")
        for folder in (out, out / BEST_DIR):
            for name in [checkpoint.META_FILE, METRICS_FILE, PLOT_FILE]:
                (folder / name).unlink(missing_ok=True)
            for old in [*folder.glob("weights-e*.safetensors"), *folder.glob(".*.tmp")]:
                old.unlink()
        if (out / BEST_DIR).is_dir() and not any((out / BEST_DIR).iterdir()):
            (out / BEST_DIR).rmdir()
    out.mkdir(parents=True, exist_ok=True)


def fit(run: Run, out=None, log: Callable[[str], None] | None = None, progress: bool = True) -> list[dict]:
    """Train up to `run.train_cfg.num_epochs`, evaluating, logging and checkpointing every `log_every`.

    `log` receives one line per logged epoch (default: printed above the progress bar).
    """
    from tqdm.auto import tqdm
    log = log or tqdm.write
    cfg = run.train_cfg
    _check_trainable(run.dataset, cfg)
    if out is not None and run.epoch == 0:
        prepare_out(out, overwrite=False)       # a new run never clobbers one already saved there
    window = EpochStats()       # training since the last log: tokens/s and train ppl of the interval
    bar = tqdm(total=cfg.num_epochs, initial=run.epoch, unit="epoch", disable=not progress or None,
               leave=False, dynamic_ncols=True)
    session_start, elapsed_before = time.perf_counter(), run.elapsed_s
    try:
        while run.epoch < cfg.num_epochs:
            with np.errstate(over="ignore", invalid="ignore"):   # divergence is caught just below
                stats = train_epoch(run.backend, run.dataset.train, cfg, run.rng, run.optimizer, run.epoch,
                                    run.model_cfg.dropout, run.model_cfg.weight_drop)
            run.epoch += 1
            bar.update(1)
            bar.set_postfix(ppl=f"{stats.ppl:.3f}")
            window.add(stats)
            if not math.isfinite(stats.nll_sum):
                raise RnnlabError(f"training diverged at epoch {run.epoch} (loss is not finite); "
                                  "try a smaller --lr or turn clipping on with --clip")
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
                run.records.append(make_record(run, stats, window, val, samples(run)))
                log(format_record(run.records[-1]))
                if out is not None:
                    save_run(run, out, best=improved)
                window = EpochStats()
                if cfg.patience and run.evals_since_best >= cfg.patience:
                    log(f"early stop at epoch {run.epoch}: no better held-out loss in {cfg.patience} "
                        f"evaluations (best {math.exp(run.best_val_nats):.3f} ppl, kept in {BEST_DIR}/)")
                    break
                if out_of_time:
                    log(f"time budget of {cfg.time_budget:g} min reached at epoch {run.epoch}")
                    break
    finally:
        bar.close()
    return run.records
