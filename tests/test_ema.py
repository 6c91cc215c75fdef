"""Weight averaging (--ema): the average is the bias-corrected exponential mean of the weights after each
update, the weights a run evaluates and a checkpoint's model is loaded with, kept in the checkpoint as an
optimizer buffer so that resuming stays bit-exact; training itself goes on from the trained weights."""
import dataclasses
import json

import numpy as np
import pytest

from rnnlab import checkpoint, evaluate, optim, train
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError

from conftest import DATA
from helpers import assert_resume_is_bit_exact, one_line_error, run_cli

DATA_CFG = DataConfig(max_tokens=400)
MODEL = ModelConfig(num_hiddens=8)
BASE = TrainConfig(batch_size=4, num_steps=5, num_epochs=3, log_every=1, backend="numpy", num_preds=3,
                   theta=0.05, optimizer="adam", lr=0.01, ema=0.9)
BACKENDS = {"numpy": {}, "torch-fused": dict(backend="torch", torch_impl="fused"),
            "torch-nn": dict(backend="torch", torch_impl="nn"), "jax": dict(backend="jax")}


def needs(backend: str) -> None:
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    if backend.startswith("torch"):
        pytest.importorskip("torch")
    if backend == "jax":
        pytest.importorskip("jax")


def test_the_average_is_the_bias_corrected_exponential_mean():
    d = 0.9
    opt = optim.make_optimizer("sgd", ema=d)
    params = {"W_hh": np.array([[1.0, -2.0]]), "b_h": np.array([0.5])}
    assert opt.averaged(params) is params                         # no update yet: the weights themselves
    history = []
    for t in range(1, 6):
        grads = {"W_hh": np.array([[t, 1.0 - t]]), "b_h": np.array([0.25 * t])}
        params = opt.step(params, grads, lr=0.3)
        history.append(params)
        weights = [(1 - d) * d ** (t - s) for s in range(1, t + 1)]
        for name in params:
            expected = sum(w * h[name] for w, h in zip(weights, history)) / sum(weights)
            np.testing.assert_allclose(opt.averaged(params)[name], expected, rtol=1e-13)
    np.testing.assert_allclose(sum(weights), 1 - d ** 5, rtol=1e-13)


def test_no_average_means_no_buffer_and_the_weights_themselves():
    opt = optim.make_optimizer("adam")
    params = opt.step({"W_hh": np.ones(2)}, {"W_hh": np.ones(2)}, 0.1)
    assert opt.buffers == ("m", "v") and set(opt.state) == {"m", "v"}
    assert opt.averaged(params) is params
    assert "ema" not in opt.state_dict()[0]


def test_the_optimizer_state_refuses_another_decay():
    opt = optim.make_optimizer("adam", ema=0.9)
    params = opt.step({"W_hh": np.ones(2)}, {"W_hh": np.ones(2)}, 0.1)
    meta, arrays = opt.state_dict()
    assert meta == {"name": "adam", "t": 1, "ema": 0.9} and set(arrays) == {"m.W_hh", "v.W_hh", "ema.W_hh"}
    with pytest.raises(ValueError, match="ema"):
        optim.make_optimizer("adam", ema=0.99).load_state_dict(meta, arrays, params)
    with pytest.raises(ValueError, match="unexpected: ema.W_hh"):
        optim.make_optimizer("adam").load_state_dict({"name": "adam", "t": 1}, arrays, params)
    missing = {k: v for k, v in arrays.items() if not k.startswith("ema.")}
    with pytest.raises(ValueError, match="missing: ema.W_hh"):
        optim.make_optimizer("adam", ema=0.9).load_state_dict(meta, missing, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_holds_the_average_and_gives_the_trained_weights_back(backend):
    """Inside `averaged_weights` the backend scores the average; afterwards it holds the trained weights
    again, the same values even where the backend copies an update into its own storage (torch.nn)."""
    needs(backend)
    model = dataclasses.replace(MODEL, cell_variant="nn") if backend == "torch-nn" else MODEL
    run = train.new_run(DATA_CFG, model, dataclasses.replace(BASE, num_epochs=1, **BACKENDS[backend]))
    train.train_epoch(run.backend, run.dataset.train, run.train_cfg, run.rng, run.optimizer)
    trained = run.backend.numpy_params()
    average = {k: np.asarray(optim._to_numpy(v)) for k, v in run.optimizer.averaged(run.backend.params).items()}
    assert any(not np.allclose(trained[k], average[k]) for k in trained)
    with train.averaged_weights(run):
        inside = run.backend.numpy_params()
        scored = evaluate.score_stream(run.backend, run.dataset.val)["nats_per_token"]
    after = run.backend.numpy_params()
    for name in trained:
        np.testing.assert_array_equal(after[name], trained[name])
        np.testing.assert_allclose(inside[name], average[name], rtol=1e-6)
    assert scored != evaluate.score_stream(run.backend, run.dataset.val)["nats_per_token"]


@pytest.mark.parametrize("backend", ["numpy", "torch-fused"])
def test_resume_is_bit_exact_with_the_average(tmp_path, monkeypatch, backend):
    needs(backend)
    assert_resume_is_bit_exact(tmp_path, monkeypatch, DATA_CFG, MODEL, dataclasses.replace(BASE, **BACKENDS[backend]))
    a, b = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "split")
    assert a.optimizer == b.optimizer == {"name": "adam", "t": a.optimizer["t"], "ema": 0.9}
    for name in a.params:
        assert np.array_equal(a.optimizer_arrays[f"ema.{name}"], b.optimizer_arrays[f"ema.{name}"]), name


def test_a_checkpoint_loads_its_average_and_scores_what_the_run_logged(tmp_path):
    needs("numpy")
    run = train.new_run(DATA_CFG, MODEL, BASE)
    train.fit(run, tmp_path, progress=False, log=lambda s: None)
    ckpt = checkpoint.load(tmp_path)
    t = ckpt.optimizer["t"]
    loaded = checkpoint.load_model(tmp_path, backend="numpy")
    for name, p in loaded.backend.params.items():
        np.testing.assert_allclose(p, ckpt.optimizer_arrays[f"ema.{name}"] / (1 - 0.9 ** t), rtol=1e-6)
        assert p.dtype == ckpt.params[name].dtype
    val = evaluate.score_stream(loaded.backend, run.dataset.val)["perplexity"]
    assert val == pytest.approx(train.read_metrics(tmp_path)[-1]["val_ppl"], rel=1e-12)
    assert not np.array_equal(loaded.backend.params["W_hq"], ckpt.params["W_hq"])

    again = train.start_from(tmp_path, {}, {}, {"ema": 0.0})        # fine-tuning starts from the average
    for name, p in again.backend.params.items():
        np.testing.assert_array_equal(p, loaded.backend.params[name])


def test_a_checkpoint_whose_decay_was_changed_is_refused(tmp_path):
    needs("numpy")
    train.fit(train.new_run(DATA_CFG, MODEL, dataclasses.replace(BASE, num_epochs=1)), tmp_path,
              progress=False, log=lambda s: None)
    meta_path = tmp_path / checkpoint.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["optimizer"]["ema"] = 0.5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RnnlabError, match="optimizer.ema"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_a_decay_outside_0_1_is_one_clear_line(tmp_path, value):
    code, out, err = run_cli("train", "--ema", value, "--max-tokens", "400", "--out", tmp_path / "r")
    one_line_error(code, err, "--ema")
    assert not (tmp_path / "r").exists()
