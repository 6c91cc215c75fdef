"""Checkpoints: round trip, verification, and atomicity under a crash mid-save."""
import json

import numpy as np
import pytest

from helpers import ARCHS, random_params
from rnnlab import checkpoint, fileio
from rnnlab.config import DataConfig, ModelConfig, TrainConfig, to_dict
from rnnlab.errors import RnnlabError

# the config random_params(V=5, H=4, float64) fits
CONFIG = {"data": to_dict(DataConfig()), "model": to_dict(ModelConfig(num_hiddens=4)),
          "train": to_dict(TrainConfig(dtype="float64"))}


def make(epoch, seed=0):
    rng = np.random.default_rng(seed)
    return checkpoint.Checkpoint(params=random_params(seed=seed), config=CONFIG,
                                 vocab=["<unk>", "a", "b", "c", "d"], epoch=epoch,
                                 rng_state=rng.bit_generator.state, extra={"note": "x"})


def test_round_trip(tmp_path):
    ckpt = make(3)
    checkpoint.save(tmp_path, ckpt)
    back = checkpoint.load(tmp_path)
    assert back.epoch == 3 and back.vocab == ckpt.vocab and back.extra["note"] == "x"
    assert back.rng_state == ckpt.rng_state
    for k, v in ckpt.params.items():
        np.testing.assert_array_equal(back.params[k], v)
        assert back.params[k].dtype == v.dtype
    assert len(list(tmp_path.glob("weights-*.safetensors"))) == 1
    assert not any(p.name.endswith(".pkl") or p.suffix == ".pt" for p in tmp_path.iterdir())


def test_old_weights_removed_after_new_save(tmp_path):
    checkpoint.save(tmp_path, make(1, seed=1))
    checkpoint.save(tmp_path, make(2, seed=2))
    files = list(tmp_path.glob("weights-*.safetensors"))
    assert len(files) == 1 and "e000002" in files[0].name
    assert checkpoint.load(tmp_path).epoch == 2


@pytest.mark.parametrize("crash_on", ["weights", "json"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_on):
    checkpoint.save(tmp_path, make(1, seed=1))
    real = fileio.atomic_write_bytes

    def crashing(path, data):
        if (crash_on == "json") == path.name.endswith(".json"):
            # die half-way through writing, as a kill would: a partial temp file, no rename
            (path.parent / f".{path.name}.partial.tmp").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", crashing)
    monkeypatch.setattr(fileio, "atomic_write_bytes", crashing)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, make(2, seed=2))
    back = checkpoint.load(tmp_path)
    assert back.epoch == 1
    np.testing.assert_array_equal(back.params["W_hh"], make(1, seed=1).params["W_hh"])


def test_atomic_write_leaves_no_temp_on_error(tmp_path):
    target = tmp_path / "f.json"
    fileio.atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        fileio.atomic_write_json(target, {"a": {1, 2}})         # not JSON: refused before writing
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_corruptions_are_one_clear_error(tmp_path):
    checkpoint.save(tmp_path, make(1))
    weights = next(tmp_path.glob("weights-*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(RnnlabError, match="SHA-256"):
        checkpoint.load(tmp_path)
    weights.unlink()
    with pytest.raises(RnnlabError, match="missing"):
        checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(RnnlabError, match="corrupt"):
        checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RnnlabError, match="not an rnnlab checkpoint"):
        checkpoint.load(tmp_path)
    with pytest.raises(RnnlabError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nowhere")


def test_orphan_left_by_a_crash_is_removed_by_the_next_save(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, make(1, seed=1))
    real = fileio.atomic_write_bytes

    def dies_before_the_json(path, data):
        if path.name.endswith(".json"):
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(fileio, "atomic_write_bytes", dies_before_the_json)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, make(2, seed=2))
    monkeypatch.undo()
    assert len(list(tmp_path.glob("weights-*.safetensors"))) == 2       # the orphan of epoch 2
    checkpoint.save(tmp_path, make(3, seed=3))
    files = list(tmp_path.glob("weights-*.safetensors"))
    assert len(files) == 1 and "e000003" in files[0].name


def test_missing_checkpoint_messages_say_what_is_missing(tmp_path):
    with pytest.raises(RnnlabError, match=r"no checkpoint at .*nope: no such directory$"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(RnnlabError, match=r"no checkpoint in .*: it has no checkpoint.json$"):
        checkpoint.load(tmp_path)


def test_trained_run_loads_strictly_with_every_adam_buffer(tmp_path):
    from rnnlab import cells, train

    run = train.new_run(DataConfig(max_tokens=400), ModelConfig(num_hiddens=8, cell="lstm"),
                        TrainConfig(batch_size=4, num_steps=5, num_epochs=1, log_every=1, backend="numpy",
                                    optimizer="adam", prefixes=("time",), num_preds=3))
    train.fit(run, tmp_path, progress=False, log=lambda s: None)
    ckpt = checkpoint.load(tmp_path)
    assert list(ckpt.params) == cells.canonical_order(ckpt.params)
    assert ckpt.optimizer["t"] > 0
    assert set(ckpt.optimizer_arrays) == {f"{b}.{k}" for b in ("m", "v") for k in ckpt.params}
    assert train.resume_run(tmp_path).optimizer.t == ckpt.optimizer["t"]


def test_nan_weights_are_never_loaded(tmp_path):
    ckpt = make(1)
    ckpt.params["W_hh"][0, 0] = np.nan
    checkpoint.save(tmp_path, ckpt)
    with pytest.raises(RnnlabError, match="W_hh holds NaN or infinite values"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_round_trips_in_canonical_order(tmp_path, arch):
    params = random_params(**ARCHS[arch])
    config = dict(CONFIG, model=to_dict(ModelConfig(num_hiddens=4, **ARCHS[arch])))
    ckpt = checkpoint.Checkpoint(params=dict(reversed(list(params.items()))), config=config,
                                 vocab=["<unk>", "a", "b", "c", "d"], epoch=1)
    checkpoint.save(tmp_path, ckpt)
    back = checkpoint.load(tmp_path)
    assert list(back.params) == list(params)            # init order = canonical order
    for name, value in params.items():
        np.testing.assert_array_equal(back.params[name], value)
