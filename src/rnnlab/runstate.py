"""The state of a training run: what it carries from epoch to epoch, and how it is built new, resumed from a
run directory, saved into a checkpoint and restored from one.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

A new run draws its initial weights and its data order from two generators spawned from one seed, so every
backend and dtype starts from the same weights; `start_from` builds a new run on another run's weights and
vocabulary instead (fine-tuning). A resumed run takes back everything a straight run would have at that
point, an epoch's end or mid-epoch (`Position`): weights, optimizer buffers, the data-order RNG, the
records, the early-stopping and divergence counters; settings that would change what it computed are
refused, and the ones that steer it from then on are recorded where they change.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cells, checkpoint, corpora, distributed, evaluate, limits, optim, prepared, rundir, samplers, text
from .backends import device_of, make_backend, set_threads
from .config import RUN_DEFINING, DataConfig, ModelConfig, TrainConfig, resets_state, to_dict, validate_sizes
from .errors import RnnlabError
from .fileio import finite_or_none, sha256_file


@dataclass
class Dataset:
    """The encoded corpus split into its training part and its held-out part, with the vocabulary. From a
    prepared text (--data DIR), train and val are slices of its token file, read with np.memmap."""
    train: np.ndarray
    val: np.ndarray
    vocab: text.Vocab
    path: Path
    sha256: str
    notes: list[str] = field(default_factory=list)      # what the preprocessing report had to say
    tokens_sha256: str | None = None                    # a prepared text's token file, recorded in checkpoints
    extra_sha256: tuple[str, ...] = ()                  # the --extra-text files, in order, recorded too
    extra_tokens: int = 0                               # how many of train's first tokens are theirs

    @property
    def own_train(self) -> np.ndarray:
        """The corpus's own training split, without the extra text before it."""
        return self.train[self.extra_tokens:]


def encode(cfg: DataConfig, vocab: text.Vocab | None = None, report: bool = False,
           also: tuple[str, ...] = ()) -> tuple[np.ndarray, text.Vocab, Path, str, list[str]]:
    """(tokens, vocab, file, sha256, notes): the whole corpus read, preprocessed and encoded (with `vocab`, or
    one built over the whole text as the book does, and over the texts in `also`, the --extra-text the run
    trains on too; `legacy` preprocessing builds the early notebook's, over the training text only), with the
    absolute path of the file it came from, the SHA-256 of its bytes and, with `report`, a note when the
    preprocessing drops or changes a large share of the text. A prepared text (cfg.prepared) is its token
    file, read with np.memmap, and the source it was prepared from."""
    if cfg.prepared:
        data = _prepared(cfg, vocab)
        return np.asarray(data.tokens), data.vocab, data.source, data.meta["source"]["sha256"], []
    raw, path, digest = corpora.load(cfg.corpus, cfg.data_dir)
    notes = preprocessing_notes(cfg, raw) if report else []
    try:
        if cfg.preprocess == "legacy" and vocab is None:
            tokens = text.tokenize(text.preprocess(raw, "legacy", cfg.token), cfg.token)
            vocab = text.legacy_vocab(evaluate.split(tokens, cfg.val_fraction, cfg.max_tokens)[0])
        if vocab is None and also:
            vocab = _joint_vocab((*also, raw), cfg)
        corpus, vocab = text.load_corpus(raw, cfg.preprocess, cfg.token, vocab=vocab)
    except RnnlabError as e:
        raise RnnlabError(f"{path}: {e}") from None
    return corpus, vocab, path.resolve(), digest, notes


def _joint_vocab(raws: tuple[str, ...], cfg: DataConfig) -> text.Vocab:
    """One vocabulary over several texts: each one's token counts, added up in the order of the texts."""
    counts: dict[str, int] = {}
    for raw in raws:
        for token, n in text.load_corpus(raw, cfg.preprocess, cfg.token)[1].token_freqs:
            counts[token] = counts.get(token, 0) + n
    return text.Vocab.from_counts(list(counts.items()))


def load_dataset(cfg: DataConfig, vocab: text.Vocab | None = None, report: bool = False) -> Dataset:
    """Read, preprocess, encode (see `encode`) and split."""
    if cfg.prepared:
        data = _prepared(cfg, vocab)
        train, val = evaluate.split(np.asarray(data.tokens), data.meta["val_fraction"], cfg.max_tokens)
        return Dataset(train, val, data.vocab, data.source, data.meta["source"]["sha256"],
                       tokens_sha256=data.meta["tokens_sha256"])
    extras = [_extra_text(name, cfg) for name in cfg.extra_text]                   # (text, file, sha256)
    corpus, vocab, path, digest, notes = encode(cfg, vocab, report, also=tuple(raw for raw, _, _ in extras))
    train, val = evaluate.split(corpus, cfg.val_fraction, cfg.max_tokens)
    own = len(train)
    if extras:
        train = np.concatenate([*(_extra_tokens(cfg, raw, where, sha, digest, vocab, val)
                                  for raw, where, sha in extras), train])
    return Dataset(train, val, vocab, path, digest, notes, extra_sha256=tuple(sha for _, _, sha in extras),
                   extra_tokens=len(train) - own)


def _canonical(extra_text) -> tuple[str, ...]:
    """The --extra-text names and files as a run records them (`corpora.canonical`)."""
    return tuple(map(corpora.canonical, extra_text))


def _extra_text(name: str, cfg: DataConfig) -> tuple[str, Path, str]:
    try:
        return corpora.load(name, cfg.data_dir)
    except RnnlabError as e:
        raise RnnlabError(f"--extra-text: {e}") from None


LEAK_WINDOW = 100        # held-out tokens in a row that an extra text must not contain


def _extra_tokens(cfg: DataConfig, raw: str, where: Path, sha: str, corpus_sha: str, vocab: text.Vocab,
                  val: np.ndarray) -> np.ndarray:
    """One --extra-text file encoded with the run's vocabulary, refused when it holds the held-out text: when
    it is the corpus itself, or contains the first, middle or last LEAK_WINDOW held-out tokens in a row (a
    held-out split shorter than that is only compared by hash: a few tokens in a row prove nothing)."""
    if sha == corpus_sha:
        raise RnnlabError(f"--extra-text {where} is the corpus itself: the run would train on its held-out split")
    try:
        tokens = text.load_corpus(raw, cfg.preprocess, cfg.token, vocab=vocab)[0]
    except RnnlabError as e:
        raise RnnlabError(f"{where}: {e}") from None
    k = LEAK_WINDOW                  # a held-out split shorter than the window is not searched for
    dtype = np.result_type(tokens, val)
    haystack = tokens.astype(dtype, copy=False).tobytes()
    for start in dict.fromkeys((0, (len(val) - k) // 2, len(val) - k)) if len(val) >= k else ():
        needle = val[start:start + k].astype(dtype).tobytes()
        at = haystack.find(needle)
        while at >= 0 and at % dtype.itemsize:                     # a match must start on a token
            at = haystack.find(needle, at + 1)
        if at >= 0:
            raise RnnlabError(f"--extra-text {where} contains the corpus's held-out text (its tokens "
                              f"{start}..{start + k}): the run would train on what it is scored on")
    return tokens


def _prepared(cfg: DataConfig, vocab: text.Vocab | None) -> prepared.Prepared:
    """The prepared text of `cfg`, checked (its token file's SHA-256 too), with `vocab` when one is given."""
    data = prepared.load(cfg.prepared)
    data.check_vocab(vocab)
    return data


def run_corpus(ckpt: checkpoint.Checkpoint, where, data_dir: str | None = None, given: str | None = None) -> str:
    """The corpus of the run whose checkpoint is `ckpt` (read from `where`), to load now: a named corpus by its
    name; a file at the path recorded when its SHA-256 is still the one recorded, else (moved or changed) the
    file of the same name with that SHA-256 along the data path (`data_dir`, $RNNLAB_DATA, the cache), in the
    current directory or beside the checkpoint. `given` (--corpus on resuming) is taken when it is the same
    text, whatever its spelling or place. Anything else is one line saying where it looked. A run on a prepared
    text keeps the corpus it records: its tokens come from the prepared directory (`prepared.of_checkpoint`)."""
    recorded, sha = ckpt.config["data"]["corpus"], ckpt.extra.get("corpus_sha256")
    if ckpt.config["data"].get("prepared"):
        return recorded
    if given is not None:
        return _same_corpus(given, recorded, sha, where, data_dir)
    if recorded in corpora.CORPORA or sha is None:       # a name, or a checkpoint older than corpus hashes
        return recorded
    for candidate in dict.fromkeys(filter(None, (recorded, ckpt.extra.get("corpus_path")))):
        path = Path(candidate).expanduser()
        if path.is_file() and sha256_file(path) == sha:
            return str(path.resolve())
    name = Path(recorded).name
    home = Path(where) if Path(where).is_dir() else Path(where).parent
    dirs = [*corpora.search_path(data_dir), Path.cwd(), home]
    found = corpora.find_by_hash(sha, name, dirs)
    if found is not None:
        return str(found)
    what = "changed since the checkpoint was written" if Path(recorded).is_file() else "is not there"
    raise RnnlabError(f"the corpus file {recorded} of {where} {what}, and no {name} with its SHA-256 "
                      f"({sha[:12]}...) is in {', '.join(dict.fromkeys(map(str, dirs)))}; give the file with "
                      "--corpus PATH")


def _same_corpus(given: str, recorded: str, sha: str | None, where, data_dir: str | None) -> str:
    """`given` (as a run records it) when it is the text the run in `where` trained on, else one line."""
    if given == recorded and given in corpora.CORPORA:
        return given
    if sha is None:
        if corpora.canonical(given) != corpora.canonical(recorded):
            raise RnnlabError(f"--corpus differs from the checkpoint in {where}, which records no SHA-256 to "
                              "compare; a resumed run keeps its corpus (start a new --out to change it)")
        return corpora.canonical(given)
    if sha256_file(corpora.locate(given, data_dir)) != sha:
        raise RnnlabError(f"--corpus {given} is not the text {where} trained on (its SHA-256 differs from the "
                          f"checkpoint's); a resumed run keeps its corpus (start a new --out, or --init-from "
                          f"{where}, to train on other text)")
    return corpora.canonical(given)


@dataclass
class EpochStats:
    """Training totals over some minibatches: an epoch so far, or the steps since the last record."""
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


@dataclass
class Position:
    """Where a run stands inside an epoch, and all a mid-epoch checkpoint needs to resume it exactly: the
    data-order RNG as it was when the epoch began (the sampler's offset and order are redrawn from it), the
    minibatches already trained, the hidden state they carried forward, and their totals."""
    epoch_rng_state: dict
    batch: int = 0
    state: object = None              # (S, B, H) backend array after `batch` minibatches; None before the first
    stats: EpochStats = field(default_factory=EpochStats)


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
    epoch: int = 0                    # completed epochs
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
    step: int = 0                     # minibatch updates done, over all epochs
    position: Position | None = None  # inside an epoch: where; None at an epoch's boundary
    saved_step: int | None = None     # the step of the checkpoint in `out`
    changes: list[dict] = field(default_factory=list)  # settings changed on resuming, each with where
    init_from: dict | None = None     # the checkpoint whose weights this run started from, if any
    world: distributed.World = distributed.ALONE   # the ranks training it together (distributed.py)

    def where(self) -> str:
        """The run's place for a message: 'epoch 3' at a boundary, else 'epoch 4, minibatch 120 (step 1356)'."""
        if self.position is None or not self.position.batch:
            return f"epoch {self.epoch}"
        return f"epoch {self.epoch + 1}, minibatch {self.position.batch} (step {self.step})"


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
    """The backend that trains `params`, with torch's CPU threads set by --threads; its `threads` attribute
    says how many (the CLI shows it)."""
    threads = set_threads(train_cfg.threads, train_cfg.backend, train_cfg.device)
    backend = make_backend(train_cfg.backend, params, model_cfg.activation, train_cfg.device,
                           torch_impl=train_cfg.torch_impl, matmul_dtype=train_cfg.matmul_dtype,
                           dropout=model_cfg.dropout)
    if threads is not None:
        backend.threads = threads
    return backend


def _optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.make_optimizer(cfg.optimizer, cfg.weight_decay, cfg.momentum, cfg.ema)


def new_run(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> Run:
    """Load the data and initialise the parameters from the seed (the book's scheme by default)."""
    validate_sizes(data_cfg, model_cfg, train_cfg)
    data_cfg = prepared.resolve(dataclasses.replace(data_cfg, corpus=corpora.canonical(data_cfg.corpus),
                                                    extra_text=_canonical(data_cfg.extra_text)))
    dataset = load_dataset(data_cfg, report=True)
    _check_trainable(dataset, train_cfg)
    limits.check_train(len(dataset.vocab), model_cfg, train_cfg)       # before any big allocation
    init_rng, data_rng = _generators(train_cfg.seed)
    params = cells.init_params(len(dataset.vocab), model_cfg.num_hiddens, init_rng, np.dtype(train_cfg.dtype),
                               model_cfg.cell, model_cfg.num_layers, model_cfg.embed_size, model_cfg.init,
                               model_cfg.cell_variant)
    train_cfg = with_prompts(sized(train_cfg, dataset), dataset, data_cfg.token)
    return Run(data_cfg, model_cfg, train_cfg, dataset, _backend(params, model_cfg, train_cfg), data_rng,
               _optimizer(train_cfg), notes=list(dataset.notes))


AUTO_TOKENS = 8_000_000          # training tokens of a run whose --num-epochs is 0 (sized to its text)
AUTO_MAX_EPOCHS = 50


def sized(train_cfg: TrainConfig, dataset: Dataset) -> TrainConfig:
    """`train_cfg` with `num_epochs=0` replaced by the epochs that make about AUTO_TOKENS training tokens
    (1 to AUTO_MAX_EPOCHS): a schedule that finishes in minutes on a CPU whatever the text's size."""
    if train_cfg.num_epochs:
        return train_cfg
    epochs = min(max(round(AUTO_TOKENS / max(len(dataset.train), 1)), 1), AUTO_MAX_EPOCHS)
    return dataclasses.replace(train_cfg, num_epochs=epochs)


def preprocessing_notes(data_cfg: DataConfig, raw: str) -> list[str]:
    """A note when the preprocessing mode drops or changes a large share of the text (owntext.report_line)."""
    from . import owntext
    if data_cfg.token != "char" or data_cfg.preprocess == "raw":
        return []
    line = owntext.report_line(owntext.preprocessing_report(raw, data_cfg.preprocess, data_cfg.token))
    return [line] if line else []


def resume_run(out, data: dict | None = None, model: dict | None = None, train: dict | None = None,
               world: distributed.World = distributed.ALONE) -> Run:
    """Rebuild a run from the checkpoint in `out`.

    `data`, `model`, `train` hold settings given anew (e.g. {"num_epochs": 1000}). Those that do not alter
    what the run computes (log_every, backend, device, prefixes, num_preds, data_dir, ...) are applied; so
    are the ones that steer it from here on without making it inexact (the learning rate, the schedule's
    horizon --num-epochs, the time budget, early stopping), each recorded in the checkpoint and the next
    metrics record; one that would change what was already computed (a size, the seed, the corpus, the
    sampling, ...) is refused. `world`: the ranks that resume it together (any number that divides the batch).
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
    data_cfg = dataclasses.replace(data_cfg, corpus=run_corpus(ckpt, out, data_cfg.data_dir,
                                                               changes["data"].get("corpus")),
                                   prepared=prepared.of_checkpoint(ckpt, out, changes["data"].get("prepared")),
                                   extra_text=_canonical(data_cfg.extra_text))
    before, train_cfg = train_cfg, dataclasses.replace(train_cfg, **changes["train"])
    if train_cfg.num_epochs == 0:
        raise RnnlabError("--num-epochs 0 (sized to the text) is for a new run; a resumed run needs the epoch "
                          "to continue up to")
    validate_sizes(data_cfg, model_cfg, train_cfg)
    limits.check_train(len(vocab), model_cfg, train_cfg)       # --num-preds may have changed
    dataset = load_dataset(data_cfg, vocab)
    if ckpt.extra.get("corpus_sha256") not in (None, dataset.sha256):
        raise RnnlabError(f"the corpus file {dataset.path} changed since the checkpoint was written; "
                          "resuming would train on different data")
    recorded = ckpt.extra.get("extra_text_sha256", [])
    if list(dataset.extra_sha256) != recorded:
        changed = [name for name, sha, was in itertools.zip_longest(data_cfg.extra_text, dataset.extra_sha256,
                                                                     recorded) if sha != was]
        raise RnnlabError(f"the --extra-text {', '.join(str(c) for c in changed)} is not the text the run in {out} "
                          f"trained on ({len(recorded)} extra text(s) recorded, by SHA-256); resuming would train "
                          "on different data")
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
    step = checkpoint_step(ckpt, len(dataset.train), train_cfg)
    records, note = rundir.records_for(out, ckpt, step)
    extra = ckpt.extra
    best = extra.get("best_val_nats")
    level = extra.get("loss_level")
    changed = _changes(before, train_cfg, ckpt.epoch, step)
    run = Run(data_cfg, model_cfg, train_cfg, dataset, backend, rng, optimizer, ckpt.epoch,
              float(extra.get("elapsed_s", 0.0)), records, math.inf if best is None else float(best),
              int(extra.get("evals_since_best", 0)), math.inf if level is None else float(level),
              float(extra.get("lr_scale", 1.0)), int(extra.get("rollbacks", 0)), out=Path(out),
              saved_epoch=ckpt.epoch, notes=[*([note] if note else []), *_schedule_note(ckpt, train_cfg)],
              run_id=extra.get("run_id"), step=step, saved_step=step,
              changes=[*extra.get("changes", []), *changed], init_from=extra.get("init_from"), world=world)
    run.events.extend(changed)
    run.notes.extend(f"--{c['setting'].replace('_', '-')} changes from {c['from']!r} to {c['to']!r} at "
                     f"{run.where()}" for c in changed)
    try:
        run.position = _position(ckpt, backend, world)
    except (TypeError, ValueError) as e:
        raise RnnlabError(f"corrupt checkpoint {out}: bad position ({e})") from None
    return run


# Settings a resumed run may change that steer what it computes from then on: recorded where they change.
STEERING = ("lr", "num_epochs", "time_budget", "patience", "on_divergence")


def _changes(before: TrainConfig, after: TrainConfig, epoch: int, step: int) -> list[dict]:
    """One record per steering setting that differs on resuming: which, from what, to what, and where."""
    return [{"setting": name, "from": getattr(before, name), "to": getattr(after, name), "epoch": epoch,
             "step": step} for name in STEERING if getattr(before, name) != getattr(after, name)]


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
             "run_id": run.run_id, "step": run.step,
             "vocab_token_freqs": [list(tf) for tf in run.dataset.vocab.token_freqs]}
    if run.dataset.tokens_sha256:
        extra["prepared_tokens_sha256"] = run.dataset.tokens_sha256
    if run.dataset.extra_sha256:
        extra["extra_text_sha256"] = list(run.dataset.extra_sha256)
    if run.changes:
        extra["changes"] = [dict(c) for c in run.changes]
    if run.init_from is not None:
        extra["init_from"] = dict(run.init_from)
    state = None
    position = run.position
    if position is not None and position.batch:
        carried = position.state is not None and not resets_state(run.train_cfg)
        stats = {f.name: getattr(position.stats, f.name) for f in dataclasses.fields(EpochStats)}
        extra["position"] = {"batch": position.batch, "epoch_rng_state": position.epoch_rng_state,
                             "carried_state": carried, "stats": stats}
        state = state_to_numpy(run.world.gather_state(position.state)) if carried else None   # all B rows
    return checkpoint.Checkpoint(params=params, config=cfg, vocab=run.dataset.vocab.idx_to_token,
                                 epoch=run.epoch, rng_state=run.rng.bit_generator.state, optimizer=opt_meta,
                                 extra=extra, optimizer_arrays=opt_arrays, state=state)


def state_to_numpy(state) -> np.ndarray:
    """A backend's (S, B, H) hidden state as a numpy copy."""
    if hasattr(state, "detach"):                   # torch
        return state.detach().cpu().numpy().copy()
    return np.array(state)


def state_from_numpy(backend, state: np.ndarray):
    """A numpy (S, B, H) hidden state as `backend`'s own array, in the dtype and on the device its
    `begin_state` gives."""
    zeros = backend.begin_state(state.shape[1])
    if isinstance(zeros, np.ndarray):
        return state.astype(zeros.dtype, copy=True)
    if hasattr(zeros, "copy_"):                    # torch
        import torch
        return zeros.copy_(torch.from_numpy(np.ascontiguousarray(state)))
    return backend._put(state.astype(np.asarray(zeros).dtype))     # jax


def _position(ckpt: checkpoint.Checkpoint, backend, world: distributed.World) -> Position | None:
    """The mid-epoch position a checkpoint holds, rebuilt for `backend` with this rank's rows of the carried
    state; None at an epoch's boundary."""
    saved = ckpt.extra.get("position")
    if saved is None:
        return None
    rows = world.rows(ckpt.config["train"]["batch_size"])
    state = None if ckpt.state is None else state_from_numpy(backend, ckpt.state[:, rows])
    return Position(saved["epoch_rng_state"], saved["batch"], state, EpochStats(**saved["stats"]))


PER_RANK = {"data": ("corpus", "data_dir", "prepared", "extra_text"),                   # may differ by rank
            "train": ("device", "threads")}


def fingerprint(run: Run) -> dict:
    """What every rank of a run must share (distributed.World.same): its settings (less where each rank finds
    its texts and runs), its text, extra text and vocabulary by their hashes, where it stands, and its
    weights' hash."""
    params = run.backend.numpy_params()
    weights = hashlib.sha256()
    for name in sorted(params):
        weights.update(name.encode() + np.ascontiguousarray(params[name]).tobytes())
    vocab = hashlib.sha256(json.dumps(run.dataset.vocab.idx_to_token).encode()).hexdigest()
    settings = {f"--{name.replace('_', '-')}": value
                for section, cfg in (("data", run.data_cfg), ("model", run.model_cfg), ("train", run.train_cfg))
                for name, value in to_dict(cfg).items() if name not in PER_RANK.get(section, ())}
    return {**settings, "the text": run.dataset.sha256, "the extra text": list(run.dataset.extra_sha256),
            "the vocabulary": vocab,
            "the training tokens": len(run.dataset.train), "the step": run.step, "the weights": weights.hexdigest()}


def checkpoint_step(ckpt: checkpoint.Checkpoint, train_tokens: int, cfg: TrainConfig) -> int:
    """The step of a checkpoint (one written before steps were counted: its epochs' worth of minibatches)."""
    if "step" in ckpt.extra:
        return ckpt.extra["step"]
    return ckpt.epoch * samplers.batches_per_epoch(train_tokens, cfg.batch_size, cfg.num_steps)


def restore(run: Run, ckpt: checkpoint.Checkpoint) -> None:
    """Put `run` back to the state saved in `ckpt` (weights, optimizer, RNG, epoch, records, counters);
    the learning-rate scale, the rollback count and the wall time carry on."""
    run.backend = _backend(ckpt.params, run.model_cfg, run.train_cfg)
    run.optimizer = _optimizer(run.train_cfg)
    run.optimizer.load_state_dict(ckpt.optimizer, ckpt.optimizer_arrays, run.backend.params)
    run.rng.bit_generator.state = ckpt.rng_state
    run.epoch = ckpt.epoch
    run.step = checkpoint_step(ckpt, len(run.dataset.train), run.train_cfg)
    run.position = _position(ckpt, run.backend, run.world)
    run.records = [r for r in run.records if not rundir.after(r, ckpt.epoch, run.step)]
    extra = ckpt.extra
    run.best_val_nats = math.inf if extra["best_val_nats"] is None else extra["best_val_nats"]
    run.evals_since_best = extra["evals_since_best"]
    run.loss_level = math.inf if extra["loss_level"] is None else extra["loss_level"]


PROMPT_SOURCE_TOKENS = 1 << 22      # prompts come from at most this many tokens of the training split


def with_prompts(train_cfg: TrainConfig, dataset: Dataset, token: str) -> TrainConfig:
    """`train_cfg` with its sample prompts: the ones configured, or with none configured (`prefixes=()`),
    prompts taken from the training text itself, in the model's own alphabet."""
    if train_cfg.prefixes:
        return train_cfg
    from . import owntext
    joiner = "" if token == "char" else " "
    training_text = joiner.join(dataset.vocab.to_tokens(dataset.own_train[:PROMPT_SOURCE_TOKENS]))
    return dataclasses.replace(train_cfg, prefixes=tuple(owntext.prompts(training_text)))


UNKNOWN_CHOICES = ("refuse", "unk")


def start_from(source, data: dict | None = None, model: dict | None = None, train: dict | None = None,
               on_unknown: str = "refuse") -> Run:
    """A new run that starts from the weights and vocabulary of the checkpoint in `source` (fine-tuning).

    The model stays the source's (only its dropout, dropout mode and weight drop may change); the data and
    training settings are the source's, overridden by the ones given: another corpus, any optimizer, learning rate,
    schedule or seed. The optimizer starts afresh at step 0. Tokens of the corpus that the vocabulary lacks
    are refused with their count and examples, or with `on_unknown="unk"` mapped to `<unk>` (a note says
    how many). Without prompts given, a run on another corpus samples from prompts taken from that text.
    """
    if on_unknown not in UNKNOWN_CHOICES:
        raise RnnlabError(f"--on-unknown takes {' or '.join(UNKNOWN_CHOICES)}, got {on_unknown!r}")
    data, model, train = dict(data or {}), dict(model or {}), dict(train or {})
    ckpt = checkpoint.load(source)
    src_data, src_model, src_train, vocab = checkpoint.read_configs(ckpt, source)
    for name, value in model.items():
        if name not in ("dropout", "dropout_mode", "weight_drop") and value != getattr(src_model, name):
            raise RnnlabError(f"--{name.replace('_', '-')} differs from the model in {source}: --init-from keeps "
                              "its architecture (only --dropout, --dropout-mode and --weight-drop may change)")
    if data.get("token", src_data.token) != src_data.token:
        raise RnnlabError(f"--token {data['token']} differs from the model in {source}, which reads "
                          f"{src_data.token} tokens")
    if corpora.canonical(data.get("corpus", src_data.corpus)) != src_data.corpus or "prepared" in data:
        data.setdefault("extra_text", ())          # another text: the source's extra text stays with its own
    if "corpus" in data and "prepared" not in data:
        data["corpus"], data["prepared"] = corpora.canonical(data["corpus"]), None
    elif "prepared" not in data:                   # the source's own text, wherever it is now
        data["corpus"] = run_corpus(ckpt, source, data.get("data_dir", src_data.data_dir))
        data["prepared"] = prepared.of_checkpoint(ckpt, source)
    data["extra_text"] = _canonical(data.get("extra_text", src_data.extra_text))
    data_cfg = prepared.resolve(dataclasses.replace(src_data, **data))
    model_cfg = dataclasses.replace(src_model, **model)
    train_cfg = dataclasses.replace(src_train, **train)
    validate_sizes(data_cfg, model_cfg, train_cfg)
    dataset = load_dataset(data_cfg, vocab)
    if dataset.sha256 != ckpt.extra.get("corpus_sha256") and "prefixes" not in train:
        train_cfg = dataclasses.replace(train_cfg, prefixes=())      # another text: prompts from it
    _check_trainable(dataset, train_cfg)
    limits.check_train(len(vocab), model_cfg, train_cfg)
    notes = _unknown_tokens(dataset, data_cfg, source, on_unknown)
    dtype = np.dtype(train_cfg.dtype)
    params = {k: v.astype(dtype) for k, v in checkpoint.model_weights(ckpt).items()}
    train_cfg = with_prompts(sized(train_cfg, dataset), dataset, data_cfg.token)
    origin = {"checkpoint": str(Path(source).resolve()), "epoch": ckpt.epoch,
              "step": ckpt.extra.get("step"), "run_id": ckpt.extra.get("run_id"),
              "corpus_sha256": ckpt.extra.get("corpus_sha256")}
    return Run(data_cfg, model_cfg, train_cfg, dataset, _backend(params, model_cfg, train_cfg),
               _generators(train_cfg.seed)[1], _optimizer(train_cfg), notes=notes, init_from=origin)


def _unknown_tokens(dataset: Dataset, data_cfg: DataConfig, source, on_unknown: str) -> list[str]:
    """Refuse (or note, with on_unknown="unk") the tokens of the corpus and of each extra text that the
    vocabulary lacks, with their count and examples, naming the text."""
    if dataset.tokens_sha256:          # a prepared text, whose vocabulary is the model's (checked on loading)
        return []
    unk = dataset.vocab.unk
    if int((dataset.train == unk).sum() + (dataset.val == unk).sum()) == 0:
        return []
    notes = []
    for name, where in [(data_cfg.corpus, dataset.path), *((name, name) for name in data_cfg.extra_text)]:
        raw = corpora.load(name, data_cfg.data_dir)[0]
        words = text.tokenize(text.preprocess(raw, data_cfg.preprocess, data_cfg.token), data_cfg.token)
        lacking = collections.Counter(t for t in words if t not in dataset.vocab.token_to_idx)
        if not lacking:
            continue
        shown = ", ".join(f"{t!r} x{n:,}" for t, n in lacking.most_common(5))
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        what = (f"{sum(lacking.values()):,} of the {len(words):,} tokens of {where} ({len(lacking)} distinct: "
                f"{shown}{more}) are not in the vocabulary of {source}")
        if on_unknown == "refuse":
            raise RnnlabError(f"{what}; --on-unknown unk maps them to <unk>, or train a new model on this text")
        notes.append(f"{what}; they are mapped to <unk>")
    return notes
