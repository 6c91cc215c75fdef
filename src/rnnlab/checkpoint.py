"""Checkpoints: weights in safetensors, everything else in JSON; loading a checkpoint never runs code.

A checkpoint directory holds

    checkpoint.json                      config, vocab, epoch, RNG state, optimizer state, data identity,
                                         and the name and SHA-256 of the weights file
    weights-e000500-<hash>.safetensors   the parameters, under the book's names, the optimizer's buffers
                                         (momentum, Adam moments, the --ema weight average) as
                                         "optimizer.<buffer>.<name>", and in a checkpoint taken
                                         mid-epoch the carried hidden state as "state"

The weights file is named by its content and written first; `checkpoint.json` is then replaced
atomically. A crash at any point leaves `checkpoint.json` naming a complete weights file: the new
checkpoint or the previous one, never a torn mix. Afterwards `save` removes the weights file the previous
checkpoint.json named and orphans whose content matches the hash in their name (rnnlab wrote them), and
nothing else.

`load` trusts nothing it reads: every field is checked against the schema (see schema.py), the weights
file must be a regular file in the directory, and the tensors must be exactly the parameters (and optimizer
buffers) the config describes, in its dtype and finite. A Checkpoint that `load` returns is valid.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import cells, limits, optim, schema
from .config import to_dict
from .errors import RnnlabError
from .fileio import atomic_write_bytes, atomic_write_json, sha256_file

FORMAT = "rnnlab-checkpoint"
VERSION = 1
META_FILE = "checkpoint.json"
WEIGHTS_NAME = re.compile(r"weights-e[0-9]{6,}-([0-9a-f]{12})\.safetensors")
LOAD_ATTEMPTS = 5           # re-reads of checkpoint.json when a writer replaced it under a reader
_MIN_HEADER_ENTRY = 40      # bytes a tensor takes in a safetensors header ("b_q":{"dtype":"F32",...}): at least
_MAX_HEADER_ENTRY = 512     # and at most, with a generous margin
_KNOWN = ("format", "version", "weights", "weights_sha256", "epoch", "config", "vocab", "rng_state", "optimizer")


@dataclass
class Checkpoint:
    """One checkpoint in memory; every one that `load` returns has passed all its checks."""
    params: dict[str, np.ndarray]
    config: dict                      # {"data": {...}, "model": {...}, "train": {...}}
    vocab: list[str]                  # idx_to_token
    epoch: int
    rng_state: dict | None = None     # numpy bit_generator.state of the data-order generator
    optimizer: dict = field(default_factory=lambda: {"name": "sgd", "t": 0})
    extra: dict = field(default_factory=dict)   # data identity, backend, last metrics, ...
    optimizer_arrays: dict[str, np.ndarray] = field(default_factory=dict)   # '<buffer>.<param>' -> array
    state: np.ndarray | None = None   # (S, B, H) hidden state carried into the next minibatch, mid-epoch

OPTIMIZER_PREFIX = "optimizer."
STATE_TENSOR = "state"       # the carried hidden state of a mid-epoch checkpoint


class _Stale(RnnlabError):
    """The weights file checkpoint.json named is gone or different: maybe a writer replaced both."""


# ---- writing ----

def save(directory, ckpt: Checkpoint) -> Path:
    """Write `ckpt` into `directory` atomically; returns the path of checkpoint.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {**ckpt.params, **{OPTIMIZER_PREFIX + k: v for k, v in ckpt.optimizer_arrays.items()}}
    if ckpt.state is not None:
        arrays[STATE_TENSOR] = ckpt.state
    blob = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    digest = hashlib.sha256(blob).hexdigest()
    weights_name = f"weights-e{ckpt.epoch:06d}-{digest[:12]}.safetensors"
    for path in (directory / weights_name, directory / META_FILE):
        if path.is_symlink():
            raise RnnlabError(f"{path} is a symbolic link; rnnlab writes checkpoints only as regular files")
    previous = _named_weights(directory / META_FILE)
    atomic_write_bytes(directory / weights_name, blob)
    meta = {"format": FORMAT, "version": VERSION, "weights": weights_name, "weights_sha256": digest,
            "epoch": ckpt.epoch, "config": ckpt.config, "vocab": ckpt.vocab, "rng_state": ckpt.rng_state,
            "optimizer": ckpt.optimizer, **ckpt.extra}
    atomic_write_json(directory / META_FILE, meta)
    _remove_old_weights(directory, weights_name, previous)
    return directory / META_FILE


def _named_weights(meta_path: Path) -> str | None:
    """The weights file name an existing checkpoint.json gives, if it is readable and well-formed."""
    try:
        meta = schema.parse_json(_read_regular(meta_path, follow=False), str(meta_path))
    except (OSError, RnnlabError):
        return None
    name = meta.get("weights") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and WEIGHTS_NAME.fullmatch(name) else None


def _remove_old_weights(directory: Path, keep: str, previous: str | None) -> None:
    """Remove the weights file checkpoint.json named before, and orphaned weights files rnnlab wrote (their
    content's SHA-256 starts with the hash in their name); leave every other file alone."""
    for path in directory.glob("weights-e*.safetensors"):
        if path.name == keep or WEIGHTS_NAME.fullmatch(path.name) is None:
            continue
        try:
            if path.name == previous and stat.S_ISREG(os.lstat(path).st_mode) or is_own_weights(path):
                path.unlink()
        except FileNotFoundError:       # removed meanwhile (another writer's cleanup)
            pass


def is_own_weights(path: Path) -> bool:
    """A regular file named weights-e<epoch>-<hash>.safetensors whose content's SHA-256 starts with <hash>:
    content-addressed, so rnnlab wrote it."""
    match = WEIGHTS_NAME.fullmatch(path.name)
    return (match is not None and stat.S_ISREG(os.lstat(path).st_mode)
            and sha256_file(path).startswith(match[1]))


def exists(directory) -> bool:
    return (Path(directory) / META_FILE).is_file()


# ---- reading ----

def _corrupt(path, why: str) -> RnnlabError:
    """One line, also when `why` quotes a library's message about the file's bytes (which may hold line breaks)."""
    return RnnlabError(f"corrupt checkpoint {path}: {' '.join(why.split())}")


def _read_regular(path: Path, limit: int | None = None, follow: bool = True) -> bytes:
    """The bytes of a regular file, opened without blocking (a fifo never hangs) and, unless `follow`,
    without following a symlink. Raises OSError, or RnnlabError for what is not a regular file or is larger
    than `limit` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _corrupt(path, "not a regular file")
        if limit is not None and st.st_size > limit:
            raise _corrupt(path, f"{st.st_size} bytes, more than the {limit} its config allows")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _meta_path(directory: Path) -> Path:
    """checkpoint.json of `directory` (or `directory` itself when it names that file). A missing checkpoint is
    one line that names the path given and what is missing there."""
    if directory.is_dir():
        if not os.path.lexists(directory / META_FILE):
            raise RnnlabError(f"no checkpoint in {directory}: it has no {META_FILE}")
        return directory / META_FILE
    if directory.name == META_FILE:
        if directory.exists():
            return directory
        raise RnnlabError(f"no checkpoint at {directory}: no such file")
    if not directory.exists():
        raise RnnlabError(f"no checkpoint at {directory}: no such directory")
    raise RnnlabError(f"no checkpoint at {directory}: not a directory")


def _read_meta(meta_path: Path) -> bytes:
    if meta_path.is_symlink():
        raise _corrupt(meta_path, "it is a symbolic link; rnnlab reads checkpoints only from regular files")
    try:
        return _read_regular(meta_path, follow=False)
    except FileNotFoundError:
        raise RnnlabError(f"no checkpoint in {meta_path.parent}: it has no {META_FILE}") from None
    except OSError as e:
        raise _corrupt(meta_path, f"cannot read it ({e.strerror})") from None


def load(directory) -> Checkpoint:
    """Read and verify a checkpoint; any problem is one clear RnnlabError.

    A writer replaces checkpoint.json and then removes the weights file it named before; a reader that read
    the old checkpoint.json may find that file gone, so it reads checkpoint.json again and retries."""
    meta_path = _meta_path(Path(directory))
    raw = _read_meta(meta_path)
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            return _parse(meta_path, raw)
        except _Stale:
            again = _read_meta(meta_path)
            if again == raw or attempt == LOAD_ATTEMPTS:
                raise
            raw = again


def _parse(meta_path: Path, raw: bytes) -> Checkpoint:
    where = f"corrupt checkpoint {meta_path}"
    meta = schema.parse_json(raw, where)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(meta_path, "not an rnnlab checkpoint")
    if meta.get("version") != VERSION:
        raise _corrupt(meta_path, f"unsupported version {schema.show(meta.get('version'))}")
    for name in ("weights", "weights_sha256", "epoch", "config", "vocab"):
        if name not in meta:
            raise schema.fail(where, name, "is missing")
    _check_weights_name(meta["weights"], meta["weights_sha256"], where)
    data_cfg, model_cfg, train_cfg, vocab = schema.check_configs(meta["config"], meta["vocab"],
                                                                 meta.get("vocab_token_freqs", []), where)
    epoch = schema.count(meta["epoch"], where, "epoch")
    rng_state = meta.get("rng_state")
    rng_state = None if rng_state is None else schema.check_rng_state(rng_state, where)
    optimizer = schema.check_optimizer_meta(meta.get("optimizer", {"name": "sgd", "t": 0}), train_cfg.optimizer,
                                            train_cfg.ema, where)
    extra = schema.check_extra({k: v for k, v in meta.items() if k not in _KNOWN}, where)
    hashes = extra.get("extra_text_sha256", [])
    if len(hashes) != len(data_cfg.extra_text):
        raise schema.fail(where, "extra_text_sha256", f"must hold one SHA-256 per extra text of the config "
                          f"({len(data_cfg.extra_text)}), not {len(hashes)}")
    state_shape = _state_shape(extra, model_cfg, train_cfg)
    params, optimizer_arrays, state = _read_weights(meta_path, meta, len(vocab), model_cfg, train_cfg.dtype,
                                                    optimizer, state_shape)
    config = {"data": to_dict(data_cfg), "model": to_dict(model_cfg), "train": to_dict(train_cfg)}
    return Checkpoint(params, config, meta["vocab"], epoch, rng_state, optimizer, extra, optimizer_arrays, state)


def _state_shape(extra: dict, model_cfg, train_cfg) -> tuple[int, ...] | None:
    """(S, B, H) of the carried state a mid-epoch checkpoint holds, or None when it holds none."""
    position = extra.get("position")
    if position is None or not position["carried_state"]:
        return None
    slices = cells.Arch(model_cfg.cell, model_cfg.num_layers).num_state_slices
    return (slices, train_cfg.batch_size, model_cfg.num_hiddens)


def _check_weights_name(name, digest, where: str) -> None:
    """`weights` is a plain file name in the directory, as `save` makes it, and agrees with its SHA-256."""
    if not (isinstance(name, str) and WEIGHTS_NAME.fullmatch(name)):
        raise schema.fail(where, "weights", "must be a file name like weights-e000010-<12 hex>.safetensors "
                                            "in the checkpoint's directory", name)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise schema.fail(where, "weights_sha256", "must be a SHA-256 in lower-case hex", digest)
    if not digest.startswith(WEIGHTS_NAME.fullmatch(name)[1]):
        raise schema.fail(where, "weights", "does not match weights_sha256", name)


def _param_shapes(vocab_size: int, model_cfg) -> dict[str, tuple[int, ...]]:
    return cells.param_shapes(vocab_size, model_cfg.num_hiddens, model_cfg.cell, model_cfg.num_layers,
                              model_cfg.embed_size, model_cfg.cell_variant)


def _num_params(model_cfg) -> int:
    """len(_param_shapes(...)) without building it: a tampered num_layers may be 2**60."""
    per_gate = 4 if model_cfg.cell_variant == "nn" else 3           # W_x*, W_h*, b_* [, b_h*]
    return bool(model_cfg.embed_size) + per_gate * len(cells.GATES[model_cfg.cell]) * model_cfg.num_layers + 2


def _buffers(optimizer: dict) -> tuple[str, ...]:
    """The optimizer's buffers a checkpoint holds: each of them once it has taken a step, none before."""
    return optim.make_optimizer(optimizer["name"], ema=optimizer.get("ema", 0.0)).buffers if optimizer["t"] > 0 else ()


def _read_weights(meta_path: Path, meta: dict, vocab_size: int, model_cfg, dtype: str, optimizer: dict,
                  state_shape: tuple[int, ...] | None = None):
    """(params in canonical order, optimizer arrays, carried state or None), read from the verified weights
    file: exactly the parameters of the config, each optimizer buffer of each parameter, and the carried
    state when the checkpoint was taken mid-epoch with one."""
    path = meta_path.parent / meta["weights"]
    tensors, most = _size_bounds(vocab_size, model_cfg, np.dtype(dtype).itemsize, len(_buffers(optimizer)))
    if state_shape is not None:
        tensors, most = tensors + 1, most + np.dtype(dtype).itemsize * math.prod(state_shape) + _MAX_HEADER_ENTRY
    blob = _read_weights_file(path, meta_path, most)
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise _Stale(f"corrupt checkpoint {path}: SHA-256 does not match {META_FILE}")
    if len(blob) < _MIN_HEADER_ENTRY * tensors:     # what bounds the loop over layers in param_shapes below
        raise _corrupt(path, f"{len(blob)} bytes cannot hold the {tensors} tensors its config needs")
    try:
        arrays = st_load(blob)
    except (SafetensorError, ValueError, TypeError, KeyError, OverflowError) as e:
        raise _corrupt(path, f"unreadable safetensors ({e})") from None
    shapes = _param_shapes(vocab_size, model_cfg)
    expected = {**shapes, **{f"{OPTIMIZER_PREFIX}{b}.{name}": shape
                             for b in _buffers(optimizer) for name, shape in shapes.items()}}
    if state_shape is not None:
        expected[STATE_TENSOR] = state_shape
    _check_tensors(arrays, expected, dtype, path)
    params = {k: arrays[k] for k in cells.canonical_order(shapes)}
    optimizer_arrays = {k[len(OPTIMIZER_PREFIX):]: arrays[k] for k in expected if k.startswith(OPTIMIZER_PREFIX)}
    return params, optimizer_arrays, arrays.get(STATE_TENSOR) if state_shape is not None else None


def _size_bounds(V: int, model_cfg, itemsize: int, num_buffers: int) -> tuple[int, int]:
    """(tensors, most bytes) of the weights file of a config, in closed form (a tampered size such as
    num_layers = 2**60 costs nothing): the data plus a generous header entry per tensor."""
    numbers = limits.num_params(V, model_cfg.num_hiddens, model_cfg.num_layers, model_cfg.cell,
                                model_cfg.embed_size, model_cfg.cell_variant)
    copies = 1 + num_buffers
    tensors = _num_params(model_cfg) * copies
    return tensors, itemsize * numbers * copies + _MAX_HEADER_ENTRY * tensors + (1 << 16)


def _read_weights_file(path: Path, meta_path: Path, limit: int) -> bytes:
    """The weights file's bytes; it must be a regular file (not a link, device or fifo) of at most `limit`."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise _corrupt(meta_path, f"weights file {path.name} is not a regular file")
        return _read_regular(path, limit, follow=False)
    except FileNotFoundError:
        raise _Stale(f"corrupt checkpoint {meta_path}: weights file {path.name} is missing") from None
    except OSError as e:
        raise _corrupt(meta_path, f"cannot read weights file {path.name} ({e.strerror})") from None


def _check_tensors(arrays: dict, expected: dict, dtype: str, path: Path) -> None:
    """Exactly the expected names, each of its shape, of the config's dtype, and finite."""
    missing = [k for k in expected if k not in arrays]
    unexpected = sorted(k for k in arrays if k not in expected)
    if missing or unexpected:
        raise _corrupt(path, f"tensors do not match the config (missing: {_some(missing)}; "
                             f"unexpected: {_some([repr(k) for k in unexpected])})")
    for name, shape in expected.items():
        a = arrays[name]
        if a.dtype != np.dtype(dtype):
            raise _corrupt(path, f"tensor {name} is {a.dtype}, not the config's dtype {dtype}")
        if a.shape != shape:
            raise _corrupt(path, f"tensor {name} has shape {a.shape}, the config needs {shape}")
        if not np.isfinite(a).all():
            raise _corrupt(path, f"tensor {name} holds NaN or infinite values")


def _some(names: list[str]) -> str:
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(names[:4]) + more if names else "none"


def model_weights(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The weights a checkpoint's model is used with: the run's average of its weights where it kept one
    (--ema), else the weights it trained last. Resuming takes both: training goes on from the latter."""
    meta = ckpt.optimizer
    if not (meta.get("ema") and meta["t"]):
        return ckpt.params
    averaging = optim.make_optimizer(meta["name"], ema=meta["ema"])
    averaging.load_state_dict(meta, ckpt.optimizer_arrays, ckpt.params)
    return averaging.averaged(ckpt.params)


def read_configs(ckpt: Checkpoint, where="checkpoint"):
    """(DataConfig, ModelConfig, TrainConfig, Vocab) of a checkpoint, checked against its weights."""
    data_cfg, model_cfg, train_cfg, vocab = schema.check_configs(ckpt.config, ckpt.vocab,
                                                                 ckpt.extra.get("vocab_token_freqs", []),
                                                                 f"corrupt checkpoint {where}")
    shapes = {k: tuple(v.shape) for k, v in ckpt.params.items()}
    if len(shapes) != _num_params(model_cfg) or shapes != _param_shapes(len(vocab), model_cfg):
        raise _corrupt(where, f"weights {shapes} do not match the config (cell {model_cfg.cell}, "
                              f"{model_cfg.num_layers} layers, H={model_cfg.num_hiddens}, V={len(vocab)}, "
                              f"embed_size {model_cfg.embed_size})")
    return data_cfg, model_cfg, train_cfg, vocab


@dataclass
class LoadedModel:
    """A checkpoint made ready to use: a backend holding its weights, the vocabulary, and its configs."""
    backend: object
    vocab: object
    data_cfg: object
    model_cfg: object
    checkpoint: Checkpoint
    train_cfg: object = None


def load_model(directory, backend: str = "auto", device: str = "cpu", matmul_dtype: str = "same") -> LoadedModel:
    """Load a checkpoint onto any backend (trained with torch, decoded with numpy, or the other way);
    `matmul_dtype="bfloat16"` scores with bf16 matmul operands on torch (float32 models only)."""
    from .backends import make_backend

    ckpt = load(directory)
    data_cfg, model_cfg, train_cfg, vocab = read_configs(ckpt, directory)
    if matmul_dtype == "bfloat16" and train_cfg.dtype != "float32":
        raise RnnlabError(f"--matmul-dtype bfloat16 needs a float32 model; this one is {train_cfg.dtype}")
    return LoadedModel(make_backend(backend, model_weights(ckpt), model_cfg.activation, device,
                                    dropout=model_cfg.dropout, matmul_dtype=matmul_dtype),
                       vocab, data_cfg, model_cfg, ckpt, train_cfg)
