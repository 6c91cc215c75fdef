"""The state of a training run: what it carries from epoch to epoch, and how it is built new, resumed from a
run directory, saved into a checkpoint and restored from one.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

A new run draws its initial weights and its data order from two generators spawned from one seed, so every
backend and dtype starts from the same weights. A resumed run takes back everything a straight run would
have at that epoch: weights, optimizer buffers, the data-order RNG, the records, the early-stopping and
divergence counters; settings that would change what it computes are refused.
"""
from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cells, checkpoint, corpora, evaluate, limits, optim, rundir, samplers, text
from .backends import device_of, make_backend
from .config import RUN_DEFINING, DataConfig, ModelConfig, TrainConfig, to_dict, validate_sizes
from .errors import RnnlabError
from .fileio import finite_or_none


@dataclass
class Dataset:
    """The encoded corpus split into its training part and its held-out part, with the vocabulary."""
    train: np.ndarray
    val: np.ndarray
    vocab: text.Vocab
    path: Path
    sha256: str


def load_dataset(cfg: DataConfig, vocab: text.Vocab | None = None) -> Dataset:
    """Read, preprocess, encode (with `vocab`, or one built over the whole text as the book does; `legacy`
    preprocessing builds the early notebook's, over the training text only) and split."""
    raw, path, digest = corpora.load(cfg.corpus, cfg.data_dir)
    try:
        if cfg.preprocess == "legacy" and vocab is None:
            tokens = text.tokenize(text.preprocess(raw, "legacy", cfg.token), cfg.token)
            vocab = text.legacy_vocab(evaluate.split(tokens, cfg.val_fraction, cfg.max_tokens)[0])
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
    loss_level: float = math.inf      # lowest epoch training loss so far (nats per token)
    lr_scale: float = 1.0             # ROLLBACK_LR_FACTOR ** rollbacks: scales the scheduled learning rate
    rollbacks: int = 0
    events: list[dict] = field(default_factory=list)   # rollbacks since the last record
    out: Path | None = None           # the run directory this run last saved to or was loaded from
    saved_epoch: int | None = None    # the epoch of its checkpoint there
    notes: list[str] = field(default_factory=list)     # what loading had to say (shown by the CLI)
    run_id: str | None = field(default_factory=lambda: uuid.uuid4().hex)   # tells this run's best/ from others
    writer: object = None             # the rundir.RunWriter while fit() runs
    events_logged: set = field(default_factory=set)    # one-time warnings already shown


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
    limits.check_train(len(dataset.vocab), model_cfg, train_cfg)       # before any big allocation
    init_rng, data_rng = _generators(train_cfg.seed)
    params = cells.init_params(len(dataset.vocab), model_cfg.num_hiddens, init_rng, np.dtype(train_cfg.dtype),
                               model_cfg.cell, model_cfg.num_layers, model_cfg.embed_size, model_cfg.init,
                               model_cfg.cell_variant)
    return Run(data_cfg, model_cfg, train_cfg, dataset, _backend(params, model_cfg, train_cfg), data_rng,
               _optimizer(train_cfg))


def resume_run(out, data: dict | None = None, model: dict | None = None, train: dict | None = None) -> Run:
    """Rebuild a run from the checkpoint in `out`.

    `data`, `model`, `train` hold settings given anew (e.g. {"num_epochs": 1000}). Those that do not alter
    what the run computes (num_epochs, log_every, backend, device, prefixes, num_preds, data_dir) are
    applied; one that would change the run (a size, the seed, the corpus, ...) is refused.
    """
    rundir.check_entries(Path(out))
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
    limits.check_train(len(vocab), model_cfg, train_cfg)       # --num-preds may have changed
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
    records, note = rundir.records_for(out, ckpt)
    extra = ckpt.extra
    best = extra.get("best_val_nats")
    level = extra.get("loss_level")
    return Run(data_cfg, model_cfg, train_cfg, dataset, backend, rng, optimizer, ckpt.epoch,
               float(extra.get("elapsed_s", 0.0)), records, math.inf if best is None else float(best),
               int(extra.get("evals_since_best", 0)), math.inf if level is None else float(level),
               float(extra.get("lr_scale", 1.0)), int(extra.get("rollbacks", 0)), out=Path(out),
               saved_epoch=ckpt.epoch, notes=[*([note] if note else []), *_schedule_note(ckpt, train_cfg)],
               run_id=extra.get("run_id"))


def _schedule_note(ckpt: checkpoint.Checkpoint, train_cfg: TrainConfig) -> list[str]:
    """A cosine schedule decays to 0 at --num-epochs: resuming with another horizon changes every later
    learning rate, so the run is no longer the one it would have been."""
    before = ckpt.config["train"]["num_epochs"]
    if train_cfg.schedule != "cosine" or train_cfg.num_epochs == before:
        return []
    return [f"the cosine schedule now decays to 0 at epoch {train_cfg.num_epochs}, not {before}: from here on "
            "the learning rates differ from the original run's"]


def make_checkpoint(run: Run) -> checkpoint.Checkpoint:
    """The run's state as a checkpoint: weights, optimizer buffers, RNG, records and counters (numpy
    copies, so it stays valid while training goes on). The loop takes one only of a state that its
    divergence check passed, so no checkpoint holds a value that is not finite."""
    params = run.backend.numpy_params()
    opt_meta, opt_arrays = run.optimizer.state_dict()
    cfg = {"data": to_dict(run.data_cfg), "model": to_dict(run.model_cfg), "train": to_dict(run.train_cfg)}
    extra = {"corpus_path": str(run.dataset.path), "corpus_sha256": run.dataset.sha256,
             "train_tokens": len(run.dataset.train), "val_tokens": len(run.dataset.val),
             "backend": run.backend.name, "device": device_of(run.backend), "elapsed_s": run.elapsed_s,
             "metrics": run.records[-1] if run.records else None,
             "best_val_nats": finite_or_none(run.best_val_nats), "evals_since_best": run.evals_since_best,
             "loss_level": finite_or_none(run.loss_level), "lr_scale": run.lr_scale, "rollbacks": run.rollbacks,
             "run_id": run.run_id,
             "vocab_token_freqs": [list(tf) for tf in run.dataset.vocab.token_freqs]}
    return checkpoint.Checkpoint(params=params, config=cfg, vocab=run.dataset.vocab.idx_to_token,
                                 epoch=run.epoch, rng_state=run.rng.bit_generator.state, optimizer=opt_meta,
                                 extra=extra, optimizer_arrays=opt_arrays)


def restore(run: Run, ckpt: checkpoint.Checkpoint) -> None:
    """Put `run` back to the state saved in `ckpt` (weights, optimizer, RNG, epoch, records, counters);
    the learning-rate scale, the rollback count and the wall time carry on."""
    run.backend = _backend(ckpt.params, run.model_cfg, run.train_cfg)
    run.optimizer = _optimizer(run.train_cfg)
    run.optimizer.load_state_dict(ckpt.optimizer, ckpt.optimizer_arrays, run.backend.params)
    run.rng.bit_generator.state = ckpt.rng_state
    run.epoch = ckpt.epoch
    run.records = [r for r in run.records if r["epoch"] <= ckpt.epoch]
    extra = ckpt.extra
    run.best_val_nats = math.inf if extra["best_val_nats"] is None else extra["best_val_nats"]
    run.evals_since_best = extra["evals_since_best"]
    run.loss_level = math.inf if extra["loss_level"] is None else extra["loss_level"]
