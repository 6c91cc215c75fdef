"""What rnnlab reads back from disk is checked, never trusted: every tampered checkpoint.json or weights file,
and every malformed metrics record, ends in one RnnlabError line, never in a traceback or a wrong model."""
import copy
import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from rnnlab import cells, checkpoint, optim, schema
from rnnlab.config import DataConfig, ModelConfig, TrainConfig, to_dict
from rnnlab.errors import RnnlabError

VOCAB = ["<unk>", " ", "a", "b", "c"]
MODEL = ModelConfig(num_hiddens=4, cell="gru")
TRAIN = TrainConfig(optimizer="adam", dtype="float32")
RECORD = {"epoch": 3, "train_ppl": 4.2, "val_ppl": 5.1, "val_bpc": 2.35, "val_bits_per_token": 2.35,
          "val_tokens": 100, "tokens_per_s": 1000.0, "lr": 1.0, "clip_frac": 0.5, "elapsed_s": 1.5,
          "samples": {"time": "time a b"}}


def valid_checkpoint(epoch=3, t=2, seed=0) -> checkpoint.Checkpoint:
    """A small GRU checkpoint with Adam state and every extra field the training loop writes."""
    rng = np.random.default_rng(seed)
    params = cells.init_params(len(VOCAB), MODEL.num_hiddens, rng, np.float32, MODEL.cell)
    arrays = {f"{b}.{k}": rng.random(v.shape).astype(np.float32) for b in ("m", "v") for k, v in params.items()}
    extra = {"corpus_path": "/data/t.txt", "corpus_sha256": "ab" * 32, "train_tokens": 900, "val_tokens": 100,
             "backend": "numpy", "elapsed_s": 1.5, "metrics": dict(RECORD, epoch=epoch), "best_val_nats": 1.6,
             "evals_since_best": 0, "lr_scale": 1.0, "vocab_token_freqs": [[" ", 5], ["a", 3], ["b", 1]]}
    config = {"data": to_dict(DataConfig()), "model": to_dict(MODEL), "train": to_dict(TRAIN)}
    return checkpoint.Checkpoint(params, config, list(VOCAB), epoch, rng.bit_generator.state,
                                 {"name": "adam", "t": t}, extra, arrays if t else {})


@pytest.fixture
def saved(tmp_path) -> Path:
    checkpoint.save(tmp_path / "run", valid_checkpoint())
    return tmp_path / "run"


def read_meta(directory: Path) -> dict:
    return json.loads((directory / "checkpoint.json").read_text())


def write_meta(directory: Path, meta: dict) -> None:
    (directory / "checkpoint.json").write_text(json.dumps(meta))


def write_weights(directory: Path, blob: bytes, meta: dict | None = None) -> dict:
    """Replace the weights file by `blob` under a correct content-addressed name and hash."""
    meta = meta or read_meta(directory)
    (directory / meta["weights"]).unlink(missing_ok=True)
    digest = hashlib.sha256(blob).hexdigest()
    meta["weights"] = f"weights-e{3:06d}-{digest[:12]}.safetensors"
    meta["weights_sha256"] = digest
    (directory / meta["weights"]).write_bytes(blob)
    write_meta(directory, meta)
    return meta


def tensors(directory: Path) -> dict:
    return dict(st_load((directory / read_meta(directory)["weights"]).read_bytes()))


def assert_refused(directory: Path, *fragments: str) -> str:
    with pytest.raises(RnnlabError) as e:
        checkpoint.load(directory)
    message = str(e.value)
    assert "\n" not in message and message.startswith(("corrupt checkpoint", "no checkpoint")), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- a valid checkpoint ----

def test_valid_checkpoint_round_trips_in_canonical_order(saved):
    ckpt = valid_checkpoint()
    back = checkpoint.load(saved)
    assert list(back.params) == cells.canonical_order(ckpt.params) == list(cells.param_shapes(5, 4, "gru"))
    for name, value in ckpt.params.items():
        np.testing.assert_array_equal(back.params[name], value)
    assert back.optimizer_arrays.keys() == ckpt.optimizer_arrays.keys()
    assert back.optimizer == {"name": "adam", "t": 2} and back.rng_state == ckpt.rng_state
    assert back.extra == ckpt.extra and back.epoch == 3 and back.vocab == VOCAB
    data, model, train, vocab = checkpoint.read_configs(back, saved)
    assert model == MODEL and train == TRAIN and vocab.idx_to_token == VOCAB


def test_tensor_order_does_not_depend_on_the_file(saved):
    arrays = tensors(saved)
    write_weights(saved, st_save(dict(reversed(list(arrays.items())))))
    assert list(checkpoint.load(saved).params) == list(cells.param_shapes(5, 4, "gru"))


def test_checkpoint_from_before_a_field_existed_loads_with_its_default(saved):
    meta = read_meta(saved)
    del meta["config"]["model"]["init"], meta["config"]["train"]["on_divergence"], meta["lr_scale"]
    del meta["rng_state"], meta["vocab_token_freqs"]
    meta["config"]["train"]["lr"] = 1                       # an int where a float is expected is a number
    meta["note"] = {"kept": [1, 2]}                         # an extra field unknown here is kept
    write_meta(saved, meta)
    ckpt = checkpoint.load(saved)
    _, model, train, _ = checkpoint.read_configs(ckpt, saved)
    assert model.init == "normal" and train.on_divergence == "stop" and train.lr == 1.0
    assert isinstance(ckpt.config["train"]["lr"], float) and ckpt.rng_state is None
    assert ckpt.extra["note"] == {"kept": [1, 2]}


def test_fresh_optimizer_state_has_no_buffers(tmp_path):
    checkpoint.save(tmp_path, valid_checkpoint(t=0))
    assert checkpoint.load(tmp_path).optimizer_arrays == {}


# ---- where the checkpoint is ----

def test_no_such_directory(tmp_path):
    assert_refused(tmp_path / "nope", f"no checkpoint at {tmp_path / 'nope'}: no such directory")


def test_directory_without_checkpoint(tmp_path):
    assert_refused(tmp_path, f"no checkpoint in {tmp_path}: it has no checkpoint.json")


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert_refused(tmp_path / "notes.txt", "not a directory")


def test_checkpoint_json_may_be_named_directly(saved):
    assert checkpoint.load(saved / "checkpoint.json").epoch == 3


def test_symlinked_checkpoint_json_is_not_followed(saved, tmp_path):
    (tmp_path / "elsewhere.json").write_bytes((saved / "checkpoint.json").read_bytes())
    (saved / "checkpoint.json").unlink()
    (saved / "checkpoint.json").symlink_to(tmp_path / "elsewhere.json")
    assert_refused(saved, "symbolic link")


def test_checkpoint_json_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "checkpoint.json")
    assert_refused(tmp_path, "not a regular file")


# ---- tampered checkpoint.json ----

def _set(path: str, value):
    """An edit of checkpoint.json: set the field at dotted `path` (list indices as numbers)."""
    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


def _delete(path: str):
    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        del node[last]
    return edit


EDITS = {
    "not an object": lambda m: m.clear() or m.update({"format": "rnnlab-checkpoint", "version": 1, "x": [1]}),
    "other format": _set("format", "something-else"),
    "version 2": _set("version", 2),
    "version as text": _set("version", "1"),
    "no weights": _delete("weights"),
    "no epoch": _delete("epoch"),
    "no config": _delete("config"),
    "no vocab": _delete("vocab"),
    "negative epoch": _set("epoch", -1),
    "bool epoch": _set("epoch", True),
    "float epoch": _set("epoch", 3.0),
    "text epoch": _set("epoch", "3"),
    "config not an object": _set("config", [1, 2]),
    "config section missing": _delete("config.train"),
    "config section unknown": _set("config.extra", {}),
    "unknown config field": _set("config.model.num_hidden", 4),
    "unknown cell": _set("config.model.cell", "transformer"),
    "unknown optimizer": _set("config.train.optimizer", "lion"),
    "unknown preprocess": _set("config.data.preprocess", "lowercase"),
    "unknown token": _set("config.data.token", "byte"),
    "zero hiddens": _set("config.model.num_hiddens", 0),
    "2**60 layers": _set("config.model.num_layers", 2 ** 60),
    "2**62 hiddens": _set("config.model.num_hiddens", 2 ** 62),
    "huge hiddens": _set("config.model.num_hiddens", 10 ** 400),
    "huge lr": _set("config.train.lr", 10 ** 400),
    "negative lr": _set("config.train.lr", -1.0),
    "val_fraction 2": _set("config.data.val_fraction", 2.0),
    "bfloat16 with float64": lambda m: m["config"]["train"].update(matmul_dtype="bfloat16", dtype="float64"),
    "vocab not a list": _set("vocab", "<unk>abc"),
    "empty vocab": _set("vocab", []),
    "vocab without <unk> first": _set("vocab", [" ", "<unk>", "a", "b", "c"]),
    "duplicate vocab": _set("vocab", ["<unk>", " ", "a", "a", "c"]),
    "multi-char token": _set("vocab", ["<unk>", " ", "a", "bb", "c"]),
    "empty token": _set("vocab", ["<unk>", " ", "a", "", "c"]),
    "non-string token": _set("vocab", ["<unk>", " ", "a", 7, "c"]),
    "vocab longer than the weights": _set("vocab", ["<unk>", " ", "a", "b", "c", "d"]),
    "token freqs not pairs": _set("vocab_token_freqs", [["a"]]),
    "negative token freq": _set("vocab_token_freqs", [["a", -1]]),
    "token freqs as text": _set("vocab_token_freqs", "a:3"),
    "weights in another directory": _set("weights", "../other/weights-e000003-0123456789ab.safetensors"),
    "weights /dev/zero": _set("weights", "/dev/zero"),
    "weights /dev/stdin": _set("weights", "/dev/stdin"),
    "weights plain name": _set("weights", "weights.safetensors"),
    "weights not a string": _set("weights", ["weights-e000003-0123456789ab.safetensors"]),
    "weights hash not hex": _set("weights_sha256", "not a hash"),
    "weights hash of another name": _set("weights_sha256", "0" * 64),
    "rng_state a list": _set("rng_state", [1, 2, 3]),
    "rng_state empty": _set("rng_state", {}),
    "rng_state other generator": _set("rng_state.bit_generator", "MT19937"),
    "rng_state float": _set("rng_state.state.state", 1.5),
    "rng_state negative": _set("rng_state.state.inc", -1),
    "rng_state huge": _set("rng_state.has_uint32", 10 ** 30),
    "rng_state bool": _set("rng_state.has_uint32", True),
    "optimizer not an object": _set("optimizer", "adam"),
    "optimizer name mismatch": _set("optimizer.name", "sgd"),
    "optimizer t negative": _set("optimizer.t", -1),
    "optimizer t bool": _set("optimizer.t", True),
    "optimizer t text": _set("optimizer.t", "2"),
    "optimizer unknown field": _set("optimizer.lr", 0.1),
    "optimizer t 0 with buffers": _set("optimizer.t", 0),
    "corpus_sha256 not hex": _set("corpus_sha256", "xyz"),
    "extra_text_sha256 not hex": _set("extra_text_sha256", ["xyz"]),
    "extra_text_sha256 of no extra text": _set("extra_text_sha256", ["0" * 64]),
    "extra text without its SHA-256": _set("config.data.extra_text", ["war_of_the_worlds"]),
    "corpus_path a number": _set("corpus_path", 3),
    "train_tokens negative": _set("train_tokens", -1),
    "val_tokens float": _set("val_tokens", 1.5),
    "backend a list": _set("backend", ["numpy"]),
    "elapsed_s text": _set("elapsed_s", "1.5"),
    "elapsed_s negative": _set("elapsed_s", -1),
    "metrics a list": _set("metrics", [1]),
    "metrics negative epoch": _set("metrics.epoch", -1),
    "metrics val_ppl text": _set("metrics.val_ppl", "5"),
    "metrics samples a list": _set("metrics.samples", ["a"]),
    "best_val_nats text": _set("best_val_nats", "1.6"),
    "evals_since_best bool": _set("evals_since_best", False),
    "lr_scale zero": _set("lr_scale", 0),
    "lr_scale negative": _set("lr_scale", -0.5),
    "rollbacks text": _set("rollbacks", "2"),
    "loss_level a list": _set("loss_level", [1.0]),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_tampered_checkpoint_json_is_refused(saved, edit):
    meta = read_meta(saved)
    EDITS[edit](meta)
    write_meta(saved, meta)
    assert_refused(saved, "corrupt checkpoint")


RAW = {
    "deep nesting": "[" * 100_000,
    "deep nesting inside": '{"format": "rnnlab-checkpoint", "version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep nesting, closed": "[" * 100_000 + "]" * 100_000,
    "NaN literal": None,
    "not UTF-8": b"\xff\xfe{}",
    "empty": "",
}


@pytest.mark.parametrize("case", list(RAW))
def test_unreadable_checkpoint_json_is_refused(saved, case):
    raw = RAW[case]
    if raw is None:
        raw = (saved / "checkpoint.json").read_text().replace('"lr": 1.0', '"lr": NaN')
        assert "NaN" in raw
    (saved / "checkpoint.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    assert_refused(saved, "corrupt checkpoint")


def _wrong_values(hint, choices) -> list:
    """JSON values of the wrong type (or outside the choices) for a config field."""
    if hint is int:
        return ["1", True, 1.5, None, [1]]
    if hint is float:
        return ["1.0", False, None, {"a": 1}]
    if hint is str:
        return [1, None, ["x"]] + (["not-a-choice"] if choices else [])
    if typing.get_origin(hint) is tuple:
        return ["time", [1], None]
    return [1, ["x"], {}]                                     # str | None


CONFIG_FIELDS = [(section, cls, f) for section, cls in (("data", DataConfig), ("model", ModelConfig),
                                                         ("train", TrainConfig)) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("section,cls,f", CONFIG_FIELDS, ids=[f"{s}.{f.name}" for s, _, f in CONFIG_FIELDS])
def test_every_config_field_refuses_wrong_types(saved, section, cls, f):
    hint = typing.get_type_hints(cls)[f.name]
    for value in _wrong_values(hint, f.metadata.get("choices")):
        meta = read_meta(saved)
        meta["config"][section][f.name] = value
        write_meta(saved, meta)
        assert_refused(saved, f"config.{section}.{f.name}")


def test_read_configs_checks_an_in_memory_checkpoint(saved):
    ckpt = checkpoint.load(saved)
    bad = copy.deepcopy(ckpt.config)
    bad["model"]["cell"] = "transformer"
    with pytest.raises(RnnlabError, match="config.model.cell"):
        checkpoint.read_configs(dataclasses.replace(ckpt, config=bad), saved)
    with pytest.raises(RnnlabError, match="<unk>"):
        checkpoint.read_configs(dataclasses.replace(ckpt, vocab=["a", "b"]), saved)
    deep = copy.deepcopy(ckpt.config)
    deep["model"]["num_layers"] = 2 ** 60                     # refused without building 2**60 names
    with pytest.raises(RnnlabError, match="do not match the config"):
        checkpoint.read_configs(dataclasses.replace(ckpt, config=deep), saved)


# ---- the weights file ----

def test_weights_of_another_run_are_refused(saved, tmp_path):
    checkpoint.save(tmp_path / "other", valid_checkpoint())   # same content, same name, same hash
    meta = read_meta(saved)
    (saved / meta["weights"]).unlink()
    meta["weights"] = f"../other/{meta['weights']}"
    write_meta(saved, meta)
    assert_refused(saved, "weights must be a file name")


def test_weights_symlinked_from_another_run_are_refused(saved, tmp_path):
    other = tmp_path / "other"
    checkpoint.save(other, valid_checkpoint())             # same content, same name, same hash
    name = read_meta(saved)["weights"]
    (saved / name).unlink()
    (saved / name).symlink_to(other / name)
    assert_refused(saved, "not a regular file")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_weights_that_are_not_a_file_are_refused(saved, kind):
    name = read_meta(saved)["weights"]
    (saved / name).unlink()
    os.mkfifo(saved / name) if kind == "fifo" else (saved / name).mkdir()
    assert_refused(saved, "not a regular file")


def test_weights_larger_than_the_config_allows_are_refused_unread(saved):
    arrays = tensors(saved)
    arrays["padding"] = np.zeros(1 << 20, np.float32)
    write_weights(saved, st_save(arrays))
    assert_refused(saved, "more than")


def _arrays_edit(fn):
    def edit(arrays):
        fn(arrays)
        return arrays
    return edit


WEIGHT_EDITS = {
    "int weights": _arrays_edit(lambda a: a.update(W_hq=a["W_hq"].astype(np.int32))),
    "bool weights": _arrays_edit(lambda a: a.update(b_q=a["b_q"] > 0)),
    "complex weights": _arrays_edit(lambda a: a.update(W_hq=a["W_hq"].astype(np.complex64))),
    "float16 weights": _arrays_edit(lambda a: a.update(W_hq=a["W_hq"].astype(np.float16))),
    "float64 weights": _arrays_edit(lambda a: a.update(W_hq=a["W_hq"].astype(np.float64))),
    "NaN weights": _arrays_edit(lambda a: a["W_hq"].__setitem__((0, 0), np.nan)),
    "inf weights": _arrays_edit(lambda a: a["b_q"].__setitem__(0, -np.inf)),
    "NaN Adam moment": _arrays_edit(lambda a: a["optimizer.v.W_hq"].__setitem__((0, 0), np.nan)),
    "wrong shape": _arrays_edit(lambda a: a.update(W_hq=a["W_hq"][:, :3].copy())),
    "transposed": _arrays_edit(lambda a: a.update(W_hh=np.ascontiguousarray(a["W_xh"].T))),
    "missing tensor": _arrays_edit(lambda a: a.pop("W_hr")),
    "extra tensor": _arrays_edit(lambda a: a.update(W_extra=np.zeros(3, np.float32))),
    "missing Adam v": _arrays_edit(lambda a: [a.pop(k) for k in list(a) if k.startswith("optimizer.v.")]),
    "one missing Adam buffer": _arrays_edit(lambda a: a.pop("optimizer.m.b_q")),
    "unknown buffer": _arrays_edit(lambda a: a.update({"optimizer.velocity.b_q": a["b_q"].copy()})),
    "Adam buffer of wrong shape": _arrays_edit(lambda a: a.update({"optimizer.m.b_q": a["b_q"][:2].copy()})),
    "Adam buffer int": _arrays_edit(lambda a: a.update({"optimizer.m.b_q": a["b_q"].astype(np.int64)})),
}


@pytest.mark.parametrize("edit", list(WEIGHT_EDITS))
def test_tampered_weights_are_refused(saved, edit):
    write_weights(saved, st_save(WEIGHT_EDITS[edit](tensors(saved))))
    assert_refused(saved, "corrupt checkpoint")


def test_weights_hash_mismatch_and_missing_weights(saved):
    meta = read_meta(saved)
    blob = bytearray((saved / meta["weights"]).read_bytes())
    blob[-1] ^= 1
    (saved / meta["weights"]).write_bytes(bytes(blob))
    assert_refused(saved, "SHA-256 does not match")
    (saved / meta["weights"]).unlink()
    assert_refused(saved, f"weights file {meta['weights']} is missing")


def test_garbage_weights_with_a_matching_hash(saved):
    header = b'{"a": 1}' + b" " * 4000
    write_weights(saved, len(header).to_bytes(8, "little") + header)
    assert_refused(saved, "unreadable safetensors")
    write_weights(saved, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    assert_refused(saved, "cannot hold the 33 tensors its config needs")


# ---- a reader racing a writer ----

def test_reader_that_read_the_previous_checkpoint_json_retries(saved, monkeypatch):
    real, calls = checkpoint._read_meta, []

    def writer_finishes_after_the_read(path):
        raw = real(path)
        calls.append(raw)
        if len(calls) == 1:
            checkpoint.save(saved, valid_checkpoint(epoch=4, seed=1))   # removes the weights `raw` names
        return raw

    monkeypatch.setattr(checkpoint, "_read_meta", writer_finishes_after_the_read)
    assert checkpoint.load(saved).epoch == 4


def test_concurrent_reader_never_sees_a_false_corruption(tmp_path):
    checkpoint.save(tmp_path, valid_checkpoint(epoch=0))
    stop, errors = threading.Event(), []

    def writer():
        epoch = 1
        while not stop.is_set():
            checkpoint.save(tmp_path, valid_checkpoint(epoch=epoch, seed=epoch % 2))
            epoch += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            try:
                checkpoint.load(tmp_path)
            except RnnlabError as e:
                errors.append(str(e))
    finally:
        stop.set()
        thread.join()
    assert errors == []


# ---- saving touches only rnnlab's own files ----

def test_save_removes_only_files_rnnlab_wrote(tmp_path):
    checkpoint.save(tmp_path, valid_checkpoint(epoch=1))
    first = read_meta(tmp_path)["weights"]
    orphan_blob = b"orphaned weights, left by a crash"
    orphan = f"weights-e000002-{hashlib.sha256(orphan_blob).hexdigest()[:12]}.safetensors"
    (tmp_path / orphan).write_bytes(orphan_blob)
    keep = {"weights-e000009-0123456789ab.safetensors": b"a user's file with a look-alike name",
            "weights-final.safetensors": b"another user file", "notes.txt": b"notes"}
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    checkpoint.save(tmp_path, valid_checkpoint(epoch=3, seed=1))
    names = {p.name for p in tmp_path.iterdir()}
    assert first not in names and orphan not in names
    assert names == {"checkpoint.json", read_meta(tmp_path)["weights"], *keep}
    assert all((tmp_path / n).read_bytes() == data for n, data in keep.items())


def test_save_over_an_unreadable_checkpoint_json_removes_nothing_else(tmp_path):
    (tmp_path / "checkpoint.json").write_text("[" * 50_000)
    (tmp_path / "weights-e000001-0123456789ab.safetensors").write_bytes(b"x")
    checkpoint.save(tmp_path, valid_checkpoint())
    assert (tmp_path / "weights-e000001-0123456789ab.safetensors").exists()
    assert checkpoint.load(tmp_path).epoch == 3


def test_save_never_writes_through_a_symlinked_checkpoint_json(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.json").symlink_to(target)
    with pytest.raises(RnnlabError, match="symbolic link"):
        checkpoint.save(tmp_path / "run", valid_checkpoint())
    assert target.read_text() == "precious"


def test_save_never_writes_through_a_symlinked_weights_file(tmp_path):
    checkpoint.save(tmp_path / "probe", valid_checkpoint())
    name = read_meta(tmp_path / "probe")["weights"]
    target = tmp_path / "elsewhere.bin"
    target.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(target)
    with pytest.raises(RnnlabError, match="symbolic link"):
        checkpoint.save(tmp_path / "run", valid_checkpoint())
    assert target.read_text() == "precious"


# ---- the optimizer's state ----

def _adam_state():
    ckpt = valid_checkpoint()
    params = {k: v.copy() for k, v in ckpt.params.items()}
    return ckpt.optimizer, dict(ckpt.optimizer_arrays), params


def test_optimizer_state_round_trips_strictly():
    meta, arrays, params = _adam_state()
    adam = optim.make_optimizer("adam")
    adam.load_state_dict(meta, arrays, params)
    back_meta, back_arrays = adam.state_dict()
    assert back_meta == meta and back_arrays.keys() == arrays.keys()


@pytest.mark.parametrize("damage", ["name", "t bool", "t negative", "t text", "missing", "t 0 with buffers",
                                    "unknown", "shape", "dtype", "nan", "not a dict"])
def test_optimizer_state_refuses_what_does_not_fit(damage):
    meta, arrays, params = _adam_state()
    meta = dict(meta)
    change = {
        "name": lambda: meta.update(name="adamw"),
        "t bool": lambda: meta.update(t=True),
        "t negative": lambda: meta.update(t=-1),
        "t text": lambda: meta.update(t="2"),
        "missing": lambda: arrays.pop("v.W_hq"),
        "t 0 with buffers": lambda: meta.update(t=0),
        "unknown": lambda: arrays.update({"velocity.W_hq": arrays["m.W_hq"]}),
        "shape": lambda: arrays.update({"m.b_q": arrays["m.b_q"][:2]}),
        "dtype": lambda: arrays.update({"m.b_q": arrays["m.b_q"].astype(np.float64)}),
        "nan": lambda: arrays.update({"m.b_q": np.full_like(arrays["m.b_q"], np.nan)}),
        "not a dict": lambda: None,
    }
    change[damage]()
    adam = optim.make_optimizer("adam")
    with pytest.raises(ValueError):
        adam.load_state_dict("adam" if damage == "not a dict" else meta, arrays, params)
    assert adam.t == 0 and adam.state == {"m": {}, "v": {}}     # nothing half-loaded


def test_optimizer_state_fits_torch_parameters():
    torch = pytest.importorskip("torch")
    meta, arrays, params = _adam_state()
    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    adam = optim.make_optimizer("adam")
    adam.load_state_dict(meta, arrays, tparams)
    assert isinstance(adam.state["m"]["W_hq"], torch.Tensor)
    with pytest.raises(ValueError, match="float64"):
        adam.load_state_dict(meta, {k: v.astype(np.float64) for k, v in arrays.items()}, tparams)


# ---- metrics records ----

def test_check_record_keeps_a_valid_record_and_extra_keys():
    r = dict(RECORD, val_ppl=None, rollbacks=[{"epoch": 2, "lr_scale": 0.5}])
    assert schema.check_record(r, "metrics.jsonl line 1") == r
    assert schema.check_record({"epoch": 0}, "m") == {"epoch": 0}


BAD_RECORDS = {
    "a list": [1],
    "no epoch": {"train_ppl": 1.0},
    "negative epoch": {"epoch": -1},
    "bool epoch": {"epoch": True},
    "float epoch": {"epoch": 1.5},
    "text ppl": dict(RECORD, val_ppl="5"),
    "nan ppl": dict(RECORD, train_ppl=float("nan")),
    "inf lr": dict(RECORD, lr=float("inf")),
    "bool tokens_per_s": dict(RECORD, tokens_per_s=True),
    "huge elapsed": dict(RECORD, elapsed_s=10 ** 400),
    "float val_tokens": dict(RECORD, val_tokens=1.5),
    "samples a list": dict(RECORD, samples=["a"]),
    "sample not text": dict(RECORD, samples={"time": 3}),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_check_record_refuses_wrong_types(case):
    with pytest.raises(RnnlabError) as e:
        schema.check_record(BAD_RECORDS[case], "run/metrics.jsonl line 2")
    assert str(e.value).startswith("run/metrics.jsonl line 2: ") and "\n" not in str(e.value)


def test_rng_state_with_deep_nesting_is_refused():
    state = np.random.default_rng().bit_generator.state
    state["x"] = json.loads("[" * 900 + "]" * 900)
    with pytest.raises(RnnlabError, match="rng_state"):
        schema.check_rng_state(state, "f")


# ---- the schema itself ----

def test_config_from_dict_defaults_types_and_choices():
    train = schema.config_from_dict(TrainConfig, {"lr": 2, "prefixes": ["a", "b"]}, "f")
    assert train == dataclasses.replace(TrainConfig(), lr=2.0, prefixes=("a", "b"))
    assert schema.config_from_dict(DataConfig, {"data_dir": None}, "f") == DataConfig()
    for bad, field in [({"lr": True}, "config.lr"), ({"optimizer": "lion"}, "config.optimizer"),
                       ({"nope": 1}, "config has unknown field 'nope'"), ({"prefixes": "ab"}, "config.prefixes")]:
        with pytest.raises(RnnlabError, match=f"^f: {field}"):
            schema.config_from_dict(TrainConfig, bad, "f")


def test_parse_json_refuses_deep_nesting_and_non_finite_constants():
    for text in ["[" * 100_000, '{"a": Infinity}', "NaN", b"\x80"]:
        with pytest.raises(RnnlabError, match="^f: unreadable JSON"):
            schema.parse_json(text, "f")


# ---- fuzz: whatever the files hold, a load succeeds or is one RnnlabError ----

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("pristine")
    checkpoint.save(directory, valid_checkpoint())
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _paths(value, prefix=()):
    """Every path into a JSON value (keys and list indices), the value itself included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8)


def _replace_at(meta, path, value):
    if not path:
        return value
    node = meta
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return meta


def _mutate(data: bytes, kind: str, position: int, byte: int, junk: bytes) -> bytes:
    position %= max(len(data), 1)
    if kind == "truncate":
        return data[:position]
    if kind == "flip":
        return data[:position] + bytes([data[position] ^ (byte or 1)]) + data[position + 1:] if data else data
    if kind == "insert":
        return data[:position] + junk + data[position:]
    return junk


def _load_or_refuse(directory: Path) -> None:
    """The invariant: a load gives a checkpoint every consumer can use, or one RnnlabError line."""
    try:
        ckpt = checkpoint.load(directory)
    except RnnlabError as e:
        assert "\n" not in str(e)
        return
    _, model, train, vocab = checkpoint.read_configs(ckpt, directory)
    assert list(ckpt.params) == list(cells.param_shapes(len(vocab), model.num_hiddens, model.cell))
    for a in [*ckpt.params.values(), *ckpt.optimizer_arrays.values()]:
        assert a.dtype == np.dtype(train.dtype) and np.isfinite(a).all()
    optim.make_optimizer(train.optimizer).load_state_dict(ckpt.optimizer, ckpt.optimizer_arrays,
                                                          {k: v.copy() for k, v in ckpt.params.items()})


def _write(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (directory / name).write_bytes(data)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = st.sampled_from(["truncate", "flip", "insert", "replace"])


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_json(pristine, data):
    files = dict(pristine)
    meta = json.loads(files["checkpoint.json"])
    if data.draw(st.booleans(), label="structured"):
        path = data.draw(st.sampled_from(list(_paths(meta))), label="path")
        edited = _replace_at(meta, path, data.draw(JSON_VALUES, label="value"))
        files["checkpoint.json"] = json.dumps(edited).encode()
    else:
        files["checkpoint.json"] = _draw_mutation(data, files["checkpoint.json"])
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), files)
        _load_or_refuse(Path(tmp))


def _draw_mutation(data, blob: bytes) -> bytes:
    """`blob` damaged in a way hypothesis draws: the kind of damage, where, and with what."""
    return _mutate(blob, data.draw(KINDS, label="kind"), data.draw(st.integers(0, 1 << 16)),
                   data.draw(st.integers(0, 255)), data.draw(st.binary(max_size=64)))


@FUZZ
@given(data=st.data())
def test_fuzz_weights_file(pristine, data):
    files = dict(pristine)
    meta = json.loads(files["checkpoint.json"])
    blob = _draw_mutation(data, files.pop(meta["weights"]))
    if data.draw(st.booleans(), label="rehash"):            # as if whoever damaged it fixed up the hash
        digest = hashlib.sha256(blob).hexdigest()
        meta.update(weights=f"weights-e000003-{digest[:12]}.safetensors", weights_sha256=digest)
    files[meta["weights"]] = blob
    files["checkpoint.json"] = json.dumps(meta).encode()
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), files)
        _load_or_refuse(Path(tmp))


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(pristine, data):
    """Edits of the header that a hash check alone would not catch: dtypes, shapes, offsets, names."""
    meta = json.loads(pristine["checkpoint.json"])
    blob = pristine[meta["weights"]]
    size = int.from_bytes(blob[:8], "little")
    header, body = json.loads(blob[8:8 + size]), blob[8 + size:]
    name = data.draw(st.sampled_from(sorted(header)))
    if name != "__metadata__":
        header[name] = _replace_at(header[name], data.draw(st.sampled_from(list(_paths(header[name])))),
                                   data.draw(JSON_VALUES | st.sampled_from(["F16", "I32", "BOOL", "C64", "F64"])))
    text = json.dumps(header).encode()
    blob = len(text).to_bytes(8, "little") + text + body
    digest = hashlib.sha256(blob).hexdigest()
    meta.update(weights=f"weights-e000003-{digest[:12]}.safetensors", weights_sha256=digest)
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), {meta["weights"]: blob, "checkpoint.json": json.dumps(meta).encode()})
        _load_or_refuse(Path(tmp))


def test_a_line_break_quoted_from_the_weights_header_stays_one_line(pristine, tmp_path):
    """safetensors quotes the bad bytes in its message; the error must still be one line (found by fuzzing)."""
    meta = json.loads(pristine["checkpoint.json"])
    blob = pristine[meta["weights"]]
    size = int.from_bytes(blob[:8], "little")
    header, body = json.loads(blob[8:8 + size]), blob[8 + size:]
    header[next(k for k in sorted(header) if k != "__metadata__")]["dtype"] = "F\n32"
    text = json.dumps(header).encode()
    blob = len(text).to_bytes(8, "little") + text + body
    digest = hashlib.sha256(blob).hexdigest()
    meta.update(weights=f"weights-e000003-{digest[:12]}.safetensors", weights_sha256=digest)
    _write(tmp_path, {meta["weights"]: blob, "checkpoint.json": json.dumps(meta).encode()})
    with pytest.raises(RnnlabError, match="unreadable safetensors") as info:
        checkpoint.load(tmp_path)
    assert "\n" not in str(info.value)


RECORDS = st.dictionaries(st.sampled_from(["epoch", *schema.RECORD_NUMBERS, "val_tokens", "samples", "other"]),
                          JSON_VALUES, max_size=6)


@settings(max_examples=200, deadline=None)
@given(RECORDS | JSON_VALUES)
def test_fuzz_check_record(record):
    try:
        assert schema.check_record(record, "m") is record
    except RnnlabError as e:
        assert str(e).startswith("m: ") and "\n" not in str(e)
