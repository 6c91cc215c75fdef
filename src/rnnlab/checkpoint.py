"""Checkpoints: weights in safetensors, everything else in JSON; loading a checkpoint never runs code.

A checkpoint directory holds

    checkpoint.json                      config, vocab, epoch, RNG state, optimizer state, data identity,
                                         and the name and SHA-256 of the weights file
    weights-e000500-<hash>.safetensors   the parameters, under the book's names, and the optimizer's
                                         buffers (momentum, Adam moments) as "optimizer.<buffer>.<name>"

The weights file is named by its content and written first; `checkpoint.json` is then replaced
atomically. A crash at any point leaves `checkpoint.json` naming a complete weights file: the new
checkpoint or the previous one, never a torn mix. Weights files no longer named are removed afterwards.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import RnnlabError
from .fileio import atomic_write_bytes, atomic_write_json

FORMAT = "rnnlab-checkpoint"
VERSION = 1
META_FILE = "checkpoint.json"


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    config: dict                      # {"data": {...}, "model": {...}, "train": {...}}
    vocab: list[str]                  # idx_to_token
    epoch: int
    rng_state: dict | None = None     # numpy bit_generator.state of the data-order generator
    optimizer: dict = field(default_factory=lambda: {"name": "sgd", "t": 0})
    extra: dict = field(default_factory=dict)   # data identity, backend, last metrics, ...
    optimizer_arrays: dict[str, np.ndarray] = field(default_factory=dict)   # '<buffer>.<param>' -> array

OPTIMIZER_PREFIX = "optimizer."


def save(directory, ckpt: Checkpoint) -> Path:
    """Write `ckpt` into `directory` atomically; returns the path of checkpoint.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {**ckpt.params, **{OPTIMIZER_PREFIX + k: v for k, v in ckpt.optimizer_arrays.items()}}
    blob = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    digest = hashlib.sha256(blob).hexdigest()
    weights_name = f"weights-e{ckpt.epoch:06d}-{digest[:12]}.safetensors"
    atomic_write_bytes(directory / weights_name, blob)
    meta = {"format": FORMAT, "version": VERSION, "weights": weights_name, "weights_sha256": digest,
            "epoch": ckpt.epoch, "config": ckpt.config, "vocab": ckpt.vocab, "rng_state": ckpt.rng_state,
            "optimizer": ckpt.optimizer, **ckpt.extra}
    atomic_write_json(directory / META_FILE, meta)
    for old in directory.glob("weights-e*.safetensors"):
        if old.name != weights_name:
            old.unlink(missing_ok=True)
    return directory / META_FILE


def exists(directory) -> bool:
    return (Path(directory) / META_FILE).is_file()


def _corrupt(path, why: str) -> RnnlabError:
    return RnnlabError(f"corrupt checkpoint {path}: {why}")


def load(directory) -> Checkpoint:
    """Read and verify a checkpoint; any problem is one clear RnnlabError."""
    directory = Path(directory)
    meta_path = directory / META_FILE if directory.is_dir() else directory
    if not meta_path.is_file():
        raise RnnlabError(f"no checkpoint at {directory} (expected {meta_path.name})")
    directory = meta_path.parent
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(meta_path, f"unreadable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(meta_path, "not an rnnlab checkpoint")
    if meta.get("version") != VERSION:
        raise _corrupt(meta_path, f"unsupported version {meta.get('version')!r}")
    try:
        weights_path = directory / meta["weights"]
        blob = weights_path.read_bytes()
    except KeyError as e:
        raise _corrupt(meta_path, f"missing field {e}") from None
    except OSError:
        raise _corrupt(meta_path, f"weights file {meta['weights']} is missing") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise _corrupt(weights_path, "SHA-256 does not match checkpoint.json")
    try:
        arrays = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise _corrupt(weights_path, str(e)) from None
    params = {k: v for k, v in arrays.items() if not k.startswith(OPTIMIZER_PREFIX)}
    optimizer_arrays = {k[len(OPTIMIZER_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIMIZER_PREFIX)}
    known = {"format", "version", "weights", "weights_sha256", "epoch", "config", "vocab", "rng_state",
             "optimizer"}
    try:
        return Checkpoint(params=params, config=meta["config"], vocab=meta["vocab"], epoch=int(meta["epoch"]),
                          rng_state=meta.get("rng_state"), optimizer=meta.get("optimizer", {}),
                          extra={k: v for k, v in meta.items() if k not in known},
                          optimizer_arrays=optimizer_arrays)
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(meta_path, f"missing or bad field {e}") from None


def read_configs(ckpt: Checkpoint, where="checkpoint"):
    """(DataConfig, ModelConfig, TrainConfig, Vocab) of a checkpoint, checked against its weights."""
    from . import cells
    from .config import DataConfig, ModelConfig, TrainConfig, from_dict
    from .text import Vocab

    try:
        data_cfg = from_dict(DataConfig, ckpt.config["data"])
        model_cfg = from_dict(ModelConfig, ckpt.config["model"])
        train_cfg = from_dict(TrainConfig, ckpt.config["train"])
        vocab = Vocab.from_tokens_list(ckpt.vocab, ckpt.extra.get("vocab_token_freqs", ()))
    except (KeyError, TypeError, ValueError, RnnlabError) as e:
        raise _corrupt(where, f"bad config or vocabulary ({e})") from None
    expected = cells.param_shapes(len(vocab), model_cfg.num_hiddens, model_cfg.cell, model_cfg.num_layers,
                                  model_cfg.embed_size)
    shapes = {k: tuple(v.shape) for k, v in ckpt.params.items()}
    if shapes != expected:
        raise _corrupt(where, f"weights {shapes} do not match the config {expected}")
    return data_cfg, model_cfg, train_cfg, vocab


@dataclass
class LoadedModel:
    """A checkpoint made ready to use: a backend holding its weights, the vocabulary, and its configs."""
    backend: object
    vocab: object
    data_cfg: object
    model_cfg: object
    checkpoint: Checkpoint


def load_model(directory, backend: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load a checkpoint onto any backend (trained with torch, decoded with numpy, or the other way)."""
    from .backends import make_backend

    ckpt = load(directory)
    data_cfg, model_cfg, _, vocab = read_configs(ckpt, directory)
    return LoadedModel(make_backend(backend, ckpt.params, model_cfg.activation, device,
                                    dropout=model_cfg.dropout), vocab, data_cfg, model_cfg, ckpt)
