"""Checkpoints: round trip, verification, and atomicity under a crash mid-save."""
import json

import numpy as np
import pytest

from helpers import random_params
from rnnlab import checkpoint, fileio
from rnnlab.errors import RnnlabError


def make(epoch, seed=0):
    rng = np.random.default_rng(seed)
    return checkpoint.Checkpoint(params=random_params(seed=seed), config={"data": {}, "model": {}, "train": {}},
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
    with pytest.raises(ValueError):
        fileio.atomic_write_json(target, {"a": float("nan")})   # not valid JSON: refused before writing
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
