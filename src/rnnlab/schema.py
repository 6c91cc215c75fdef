"""Strict validation of what rnnlab reads back from disk: checkpoint.json and metrics.jsonl.

A file may have been edited by hand, truncated, or written by something else; whatever it holds, reading it
ends either in values of the expected types and ranges or in one RnnlabError. Every message opens with the
caller's `where` (the file, or a phrase naming it) and then names the field, e.g.
`corrupt checkpoint run/checkpoint.json: config.train.lr must be a finite number, got 'fast'`.

Config sections are rebuilt field by field from the dataclasses' own type hints and `choices`, so a field
added to config.py is checked here without further code.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing

import numpy as np

from .config import DataConfig, ModelConfig, TrainConfig, validate_sizes
from .errors import RnnlabError
from .text import Vocab

RECORD_NUMBERS = ("train_ppl", "val_ppl", "val_bpc", "val_bits_per_token", "tokens_per_s", "lr", "clip_frac",
                  "elapsed_s")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNSET = object()


def fail(where: str, field: str, problem: str, value=_UNSET) -> RnnlabError:
    """The one-line error for `field` of `where`; with `value`, a short description of what was found."""
    found = "" if value is _UNSET else f", got {show(value)}"
    return RnnlabError(f"{where}: {field} {problem}{found}")


def show(value) -> str:
    """A short one-line description of a JSON value (containers by kind only: they may be huge or deep)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes | str, where: str):
    """Strict JSON (UTF-8, no NaN or Infinity) to Python values; bad text or deep nesting is one error."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise RnnlabError(f"{where}: unreadable JSON (nested too deeply)") from None
    except ValueError as e:         # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RnnlabError(f"{where}: unreadable JSON ({str(e)[:200]})") from None


# ---- scalars ----

def is_int(value) -> bool:
    """An int (not a bool) that a 64-bit integer holds: sizes, counts and seeds beyond that are damage."""
    return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < (1 << 63)


def is_number(value) -> bool:
    """An int or float that is finite (huge ints that no float holds are not)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def count(value, where: str, field: str) -> int:
    """An int >= 0 (not a bool)."""
    if not (is_int(value) and value >= 0):
        raise fail(where, field, "must be a 64-bit integer >= 0", value)
    return value


def number_or_null(value, where: str, field: str):
    if value is not None and not is_number(value):
        raise fail(where, field, "must be a finite number or null", value)
    return value


def string(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise fail(where, field, "must be a string", value)
    return value


def mapping(value, where: str, field: str) -> dict:
    if not isinstance(value, dict):
        raise fail(where, field, "must be an object", value)
    return value


# ---- configs ----

def config_from_dict(cls, d, where: str, section: str = "config"):
    """Rebuild the frozen config dataclass `cls` from a JSON object: unknown keys and wrong types are errors;
    a missing field takes its default (every field was added with a default that keeps the old behaviour)."""
    d = mapping(d, where, section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields)
    if unknown:
        raise fail(where, section, f"has unknown field {show(unknown[0])}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _field_value(hints[name], fields[name].metadata.get("choices"), value, where,
                                     f"{section}.{name}") for name, value in d.items()})


def _field_value(hint, choices, value, where: str, field: str):
    """`value` as the field's type, or an error saying what the field takes."""
    if hint is int:
        if not is_int(value):
            raise fail(where, field, "must be a 64-bit integer", value)
        return value
    if hint is float:
        if not is_number(value):
            raise fail(where, field, "must be a finite number", value)
        return float(value)
    if hint is str:
        string(value, where, field)
        if choices and value not in choices:
            raise fail(where, field, f"must be one of {', '.join(choices)}", value)
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _field_value(inner[0], choices, value, where, field)
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise fail(where, field, "must be a list of strings", value)
        return tuple(value)
    raise TypeError(f"no schema for config field {field} of type {hint}")


def check_configs(config, vocab, token_freqs, where: str):
    """(DataConfig, ModelConfig, TrainConfig, Vocab) from a checkpoint's config, vocab and
    vocab_token_freqs: every value checked, and the sizes as `validate_sizes` checks a new run's."""
    sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
    config = mapping(config, where, "config")
    if set(config) != set(sections):
        raise fail(where, "config", "must hold exactly the sections data, model and train")
    data, model, train = (config_from_dict(cls, config[name], where, f"config.{name}")
                          for name, cls in sections.items())
    try:
        validate_sizes(data, model, train)
    except RnnlabError as e:
        raise RnnlabError(f"{where}: bad config ({e})") from None
    vocab = check_vocab(vocab, data.token, where)
    token_freqs = check_token_freqs(token_freqs, where)
    return data, model, train, Vocab.from_tokens_list(vocab, token_freqs)


# ---- metrics records ----

def check_record(r, where: str) -> dict:
    """One metrics.jsonl record, checked: int epoch >= 0, finite numbers (or null), val_tokens, samples.
    Keys beyond these are kept as they are (the training loop may add its own)."""
    return _record(r, where, "")


def _record(r, where: str, prefix: str) -> dict:
    r = mapping(r, where, prefix.rstrip(".") or "the record")
    if "epoch" not in r:
        raise fail(where, f"{prefix}epoch", "is missing")
    count(r["epoch"], where, f"{prefix}epoch")
    for name in RECORD_NUMBERS:
        number_or_null(r.get(name), where, prefix + name)
    if "val_tokens" in r:
        count(r["val_tokens"], where, f"{prefix}val_tokens")
    if "samples" in r:
        samples = mapping(r["samples"], where, f"{prefix}samples")
        if not all(isinstance(v, str) for v in samples.values()):
            raise fail(where, f"{prefix}samples", "must map prompts to strings")
    return r


# ---- checkpoint metadata ----

def check_rng_state(state, where: str) -> dict:
    """A numpy PCG64 state (the data-order generator), exactly as `bit_generator.state` gives it back."""
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state
        ok = json.dumps(rng.bit_generator.state, sort_keys=True) == json.dumps(state, sort_keys=True)
    except (TypeError, ValueError, KeyError, OverflowError, AttributeError, IndexError, RecursionError):
        ok = False
    if not ok:
        raise fail(where, "rng_state", "is not a numpy PCG64 generator state")
    return rng.bit_generator.state


def check_vocab(vocab, token: str, where: str) -> list[str]:
    """idx_to_token: distinct non-empty strings, `<unk>` first; single characters for a char vocabulary."""
    if not (isinstance(vocab, list) and vocab and vocab[0] == "<unk>"):
        raise fail(where, "vocab", "must be a list of tokens starting with '<unk>'", vocab)
    for i, tok in enumerate(vocab):
        if not isinstance(tok, str) or not tok:
            raise fail(where, f"vocab[{i}]", "must be a non-empty string", tok)
        if token == "char" and i and len(tok) != 1:
            raise fail(where, f"vocab[{i}]", "must be a single character (the vocabulary is char-level)", tok)
    if len(set(vocab)) != len(vocab):
        raise fail(where, "vocab", "holds the same token twice")
    return vocab


def check_token_freqs(pairs, where: str) -> list:
    """vocab_token_freqs: [token, count] pairs."""
    field = "vocab_token_freqs"
    if not isinstance(pairs, list):
        raise fail(where, field, "must be a list of [token, count] pairs", pairs)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and is_int(pair[1])
                and pair[1] >= 0):
            raise fail(where, f"{field}[{i}]", "must be a [token, count >= 0] pair", pair)
    return pairs


def check_optimizer_meta(opt, name: str, ema: float, where: str) -> dict:
    """The optimizer's metadata: {"name": `name`, the config's optimizer, "t": updates taken >= 0, and with
    weight averaging "ema": the config's decay}."""
    opt = mapping(opt, where, "optimizer")
    unknown = sorted(set(opt) - {"name", "t", "ema"})
    if unknown:
        raise fail(where, "optimizer", f"has unknown field {show(unknown[0])}")
    if opt.get("name") != name:
        raise fail(where, "optimizer.name", f"must be {name!r}, the config's optimizer", opt.get("name"))
    if opt.get("ema", 0.0) != ema:
        if "ema" not in opt:
            raise fail(where, "optimizer.ema", f"is missing; the config averages the weights with ema {ema!r}")
        raise fail(where, "optimizer.ema", f"must be {ema!r}, the config's ema", opt.get("ema"))
    return {"name": name, "t": count(opt.get("t"), where, "optimizer.t"), **({"ema": ema} if ema else {})}


def check_extra(extra: dict, where: str) -> dict:
    """The checkpoint's further fields (data identity, backend, last metrics, ...), each checked where
    present; fields unknown here are kept untouched."""
    checks = {
        "corpus_path": string,
        "corpus_sha256": _sha256_or_null,
        "prepared_tokens_sha256": _sha256_or_null,
        "extra_text_sha256": _sha256_list,
        "train_tokens": count,
        "val_tokens": count,
        "backend": string,
        "elapsed_s": _non_negative,
        "metrics": lambda v, w, f: None if v is None else _record(v, w, f + "."),
        "best_val_nats": number_or_null,
        "evals_since_best": count,
        "lr_scale": _positive,
        "loss_level": number_or_null,
        "rollbacks": count,
        "vocab_token_freqs": lambda v, w, f: check_token_freqs(v, w),
        "step": count,
        "position": _position,
        "changes": _changes,
        "init_from": mapping,
    }
    for name, check in checks.items():
        if name in extra:
            check(extra[name], where, name)
    return extra


POSITION_STATS = ("nll_sum", "tokens", "seconds", "steps", "clipped")


def _position(value, where: str, field: str) -> dict:
    """Where a mid-epoch checkpoint stands in its epoch: minibatches done (>= 1), the RNG state the epoch
    began with, whether a carried state is saved, and the epoch's totals so far."""
    value = mapping(value, where, field)
    if set(value) != {"batch", "epoch_rng_state", "carried_state", "stats"}:
        raise fail(where, field, "must hold exactly batch, epoch_rng_state, carried_state and stats")
    if count(value["batch"], where, f"{field}.batch") < 1:
        raise fail(where, f"{field}.batch", "must be >= 1", value["batch"])
    check_rng_state(value["epoch_rng_state"], where)
    if not isinstance(value["carried_state"], bool):
        raise fail(where, f"{field}.carried_state", "must be true or false", value["carried_state"])
    stats = mapping(value["stats"], where, f"{field}.stats")
    if set(stats) != set(POSITION_STATS):
        raise fail(where, f"{field}.stats", f"must hold exactly {', '.join(POSITION_STATS)}")
    for name in POSITION_STATS:
        check = _non_negative if name in ("nll_sum", "seconds") else count
        check(stats[name], where, f"{field}.stats.{name}")
    return value


def _changes(value, where: str, field: str) -> list:
    """Settings changed on resuming: a list of {setting, from, to, epoch, step}."""
    if not isinstance(value, list):
        raise fail(where, field, "must be a list", value)
    for i, change in enumerate(value):
        change = mapping(change, where, f"{field}[{i}]")
        string(change.get("setting"), where, f"{field}[{i}].setting")
        for name in ("epoch", "step"):
            count(change.get(name), where, f"{field}[{i}].{name}")
    return value


def _sha256_list(value, where: str, field: str) -> list:
    if not (isinstance(value, list) and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in value)):
        raise fail(where, field, "must be a list of SHA-256s in lower-case hex", value)
    return value


def _sha256_or_null(value, where: str, field: str):
    if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
        raise fail(where, field, "must be a SHA-256 in lower-case hex, or null", value)
    return value


def _non_negative(value, where: str, field: str):
    if not (is_number(value) and value >= 0):
        raise fail(where, field, "must be a finite number >= 0", value)
    return value


def _positive(value, where: str, field: str):
    if not (is_number(value) and value > 0):
        raise fail(where, field, "must be a finite number > 0", value)
    return value
