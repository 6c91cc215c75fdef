"""The nn path (torch.nn's RNN/GRU/LSTM layers) against the numpy reference, the weight layout both ways, and
checkpoints that move between the nn path and the others.

float64: losses, states and gradients agree to ~1e-10 relative; float32 to ~1e-5.
"""
import dataclasses

import numpy as np
import pytest

from helpers import (ARCHS, as_np, assert_bf16_close, assert_bf16_scoring, assert_dynamic_evaluation_agrees,
                     assert_weight_drop_is_an_argument, random_batch, random_params, random_state, rel_err,
                     reversed_load)
from rnnlab import cells, checkpoint, evaluate, decoding, network, optim, train
from rnnlab.backends import make_backend
from rnnlab.backends.numpy_backend import NumpyBackend
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError
from rnnlab.train import train_epoch

torch = pytest.importorskip("torch")
from rnnlab.backends.torch_nn import RNNModel, TorchNNBackend, from_state_dict, to_state_dict  # noqa: E402

from conftest import DATA  # noqa: E402

NN_ARCHS = {name: kw for name, kw in ARCHS.items() if kw.get("cell_variant") == "nn"}
# every nn architecture with tanh, and the RNN with relu too
CASES = [(name, "tanh") for name in NN_ARCHS] + [("rnn-nn", "relu")]
TOL = {np.float64: 1e-10, np.float32: 1e-5}




class ConciseModel(torch.nn.Module):
    """The book's concise model written plainly: one multi-layer torch layer, a linear layer over
    Y.reshape(-1, H), one-hot input (or an embedding)."""

    def __init__(self, arch, activation="tanh"):
        super().__init__()
        V, H, E, L = arch.vocab_size, arch.num_hiddens, arch.embed_size, arch.num_layers
        kind = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[arch.cell]
        extra = {"nonlinearity": activation} if arch.cell == "rnn" else {}
        if E:
            self.embedding = torch.nn.Embedding(V, E, dtype=torch.float64)
        self.rnn = kind(E or V, H, num_layers=L, dtype=torch.float64, **extra)
        self.linear = torch.nn.Linear(H, V, dtype=torch.float64)
        self.arch = arch

    def forward(self, inputs, state):
        X = self.embedding(inputs.T) if self.arch.embed_size else \
            torch.nn.functional.one_hot(inputs.T, self.arch.vocab_size).double()
        L = self.arch.num_layers
        hx = (state[:L].contiguous(), state[L:].contiguous()) if self.arch.cell == "lstm" else state
        Y, new = self.rnn(X, hx)
        new = torch.cat(new) if self.arch.cell == "lstm" else new
        return self.linear(Y.reshape(-1, Y.shape[-1])), new


# ---- the weight layout ----

@pytest.mark.parametrize("arch", NN_ARCHS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip_is_exact(arch, dtype):
    params = random_params(7, 5, dtype, **NN_ARCHS[arch])
    sd = to_state_dict(params)
    back = from_state_dict(sd)
    assert list(back) == cells.canonical_order(params)
    for name in params:
        assert back[name].dtype == dtype and np.array_equal(back[name], params[name]), name
    again = to_state_dict(dict(reversed(list(back.items()))))       # any order in, the same state_dict out
    assert list(again) == list(sd) and all(np.array_equal(again[k], sd[k]) for k in sd)
    # RNNModel holds the same numbers under its own keys and gives them back under the standard ones
    model = RNNModel(cells.describe(params), dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    model.load_standard_state_dict(sd)
    assert model.begin_state(2).shape == (cells.describe(params).num_state_slices, 2, 5)
    assert all(np.array_equal(as_np(v), sd[k]) for k, v in model.standard_state_dict().items())


@pytest.mark.parametrize("arch, activation", CASES)
def test_a_plain_torch_model_loads_rnnlabs_weights_and_agrees(arch, activation):
    """to_state_dict fits the standard concise model (strict load_state_dict) and computes the numpy
    reference's logits and state; the weights of a torch model come back into rnnlab the same way."""
    V, H, B, T = 9, 5, 3, 4
    params = random_params(V, H, np.float64, scale=0.4, **NN_ARCHS[arch])
    ref = NumpyBackend(params, activation)
    plain = ConciseModel(ref.arch, activation)
    sd = to_state_dict(params)
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    plain.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    X, _ = random_batch(V, B, T)
    state = random_state(ref.arch.num_state_slices, B, H, scale=0.3)
    logits_ref, state_ref, _ = ref.forward(X, state)
    with torch.no_grad():
        logits, new_state = plain(torch.tensor(X), torch.tensor(state))
    assert rel_err(logits_ref, as_np(logits)) < 1e-12
    assert rel_err(state_ref, as_np(new_state)) < 1e-12
    # the other way: a torch model's own (random) weights into rnnlab
    fresh = ConciseModel(ref.arch, activation)
    imported = NumpyBackend(from_state_dict(fresh.state_dict()), activation)
    with torch.no_grad():
        logits, _ = fresh(torch.tensor(X), torch.tensor(state))
    assert rel_err(imported.forward(X, state)[0], as_np(logits)) < 1e-12


def test_from_state_dict_refuses_what_is_not_a_concise_model():
    book = random_params(5, 4, np.float64, cell="gru")
    with pytest.raises(ValueError, match="book's cells"):
        to_state_dict(book)
    sd = to_state_dict(random_params(5, 4, np.float64, cell="gru", cell_variant="nn"))
    with pytest.raises(ValueError, match="does not fit lstm"):
        from_state_dict(sd, cell="lstm")
    with pytest.raises(ValueError, match="missing: rnn.bias_hh_l0"):
        from_state_dict({k: v for k, v in sd.items() if k != "rnn.bias_hh_l0"})
    with pytest.raises(ValueError, match="unexpected: rnn.weight_hh_l0_reverse"):
        from_state_dict({**sd, "rnn.weight_hh_l0_reverse": sd["rnn.weight_hh_l0"]})
    with pytest.raises(ValueError, match="nn cell variant only"):
        TorchNNBackend(book)


# ---- one minibatch ----

@pytest.mark.parametrize("arch, activation", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_loss_state_and_every_gradient_agree(arch, activation, dtype, dropout):
    V, H, B, T = 11, 6, 3, 5
    params = random_params(V, H, dtype, scale=0.4, **NN_ARCHS[arch])
    ref, fast = NumpyBackend(params, activation), TorchNNBackend(params, activation)
    a = ref.arch
    X, Y = random_batch(V, B, T)
    state = random_state(a.num_state_slices, B, H, dtype, scale=0.3)
    masks = network.dropout_masks(np.random.default_rng(4), dropout, a.num_layers, B, T, H, dtype)
    l1, g1, s1 = ref.loss_and_grads(X, Y, state, masks)
    l2, g2, s2 = fast.loss_and_grads(X, Y, torch.tensor(state), masks)
    tol = TOL[dtype]
    assert l1 == pytest.approx(l2, rel=tol)
    assert s2.dtype == fast.dtype and rel_err(s1, as_np(s2)) < tol
    assert set(g2) == set(params)
    for name in params:
        assert g2[name].shape == params[name].shape and rel_err(g1[name], as_np(g2[name])) < tol, name
    # one clipped SGD step through the shared optimizer code lands in the module's own weights
    g1, n1, c1 = optim.clip_grad_norm(g1, 0.1)
    g2, n2, c2 = optim.clip_grad_norm(g2, 0.1)
    assert c1 and c2 and n1 == pytest.approx(n2, rel=tol)
    ref.update(lambda p: optim.sgd(p, g1, 1.0))
    fast.update(lambda p: optim.sgd(p, g2, 1.0))
    moved = from_state_dict(fast.model.standard_state_dict())
    for name in params:
        assert rel_err(ref.params[name], moved[name]) < tol, name
        assert np.array_equal(moved[name], fast.numpy_params()[name]), name


def test_updates_keep_the_modules_storage_and_the_named_views():
    """update copies into the parameters' own storage (cuDNN's flat buffers stay valid) and `params` keeps
    viewing it."""
    params = random_params(6, 4, np.float32, cell="lstm", num_layers=2, cell_variant="nn")
    fast = TorchNNBackend(params)
    pointers = {k: p.data_ptr() for k, p in fast.model.named_parameters()}
    fast.update(lambda p: {k: v * 0 + 1 for k, v in p.items()})
    assert pointers == {k: p.data_ptr() for k, p in fast.model.named_parameters()}
    assert all(bool((p == 1).all()) for p in fast.model.parameters())
    with torch.no_grad():
        fast.model.layers[1].weight_hh_l0[3 * 4:, 0] = 7.0          # the LSTM's o gate, column 0 of W_ho_l2
    assert bool((fast.params["W_ho_l2"][0] == 7).all()) and bool((fast.params["W_hc_l2"] == 1).all())


@pytest.mark.parametrize("arch", ["gru-nn", "lstm-nn-2layer"])
def test_weight_drop_is_an_argument_that_never_touches_the_weights(arch):
    V, H, B, T = 7, 5, 3, 4
    params = random_params(V, H, np.float64, **NN_ARCHS[arch])
    fast = TorchNNBackend(params)
    assert_weight_drop_is_an_argument(fast, params, V, B, T)


@pytest.mark.parametrize("arch", ["gru-nn", "lstm-nn-2layer", "rnn-nn"])
def test_autocast_bf16_stays_close_to_float32(arch):
    V, H, B, T = 28, 32, 8, 12
    params = random_params(V, H, np.float32, scale=0.2, **NN_ARCHS[arch])
    exact, low = TorchNNBackend(params), TorchNNBackend(params, matmul_dtype="bfloat16")
    assert_bf16_close(exact, low, params, V, B, T)
    tokens = np.random.default_rng(5).integers(0, V, 200)
    assert_bf16_scoring(exact, low, tokens)


# ---- training, scoring, decoding ----

def test_epochs_of_training_agree_float64():
    V, H = 9, 12
    corpus = np.random.default_rng(0).integers(0, V, 700)
    params = cells.init_params(V, H, np.random.default_rng(1), np.float64, cell_variant="nn")
    for sampling in ("sequential", "random"):
        cfg = TrainConfig(batch_size=4, num_steps=7, sampling=sampling, lr=1.0, theta=1.0)
        ref, fast = NumpyBackend(params), TorchNNBackend(params)
        for _ in range(3):
            a = train_epoch(ref, corpus, cfg, np.random.default_rng(7))
            b = train_epoch(fast, corpus, cfg, np.random.default_rng(7))
            assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10) and a.clipped == b.clipped
        for name in params:
            assert rel_err(ref.params[name], as_np(fast.params[name])) < 1e-10, name


@pytest.mark.parametrize("arch, dropout, weight_drop, optimizer", [
    ("lstm-nn-2layer", 0.3, 0.4, "sgd"), ("gru-nn-2layer-embed", 0.2, 0.4, "adam"), ("gru-nn", 0.0, 0.4, "sgd")])
def test_epochs_with_dropout_and_weight_drop_agree_float64(arch, dropout, weight_drop, optimizer):
    V, H = 9, 8
    corpus = np.random.default_rng(0).integers(0, V, 500)
    params = random_params(V, H, np.float64, scale=0.3, **NN_ARCHS[arch])
    cfg = TrainConfig(batch_size=4, num_steps=7, lr=0.5 if optimizer == "sgd" else 0.01, theta=1.0,
                      dtype="float64")
    ref, fast = NumpyBackend(params), TorchNNBackend(params)
    opts = [optim.make_optimizer(optimizer) for _ in range(2)]
    for epoch in range(3):
        a = train_epoch(ref, corpus, cfg, np.random.default_rng(7 + epoch), opts[0], epoch, dropout, weight_drop)
        b = train_epoch(fast, corpus, cfg, np.random.default_rng(7 + epoch), opts[1], epoch, dropout, weight_drop)
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10) and a.clipped == b.clipped
    for name in params:
        assert rel_err(ref.params[name], as_np(fast.params[name])) < 1e-10, name


@pytest.mark.parametrize("arch", ["rnn-nn", "lstm-nn-2layer", "gru-nn-2layer-embed"])
def test_scoring_decoding_and_dynamic_evaluation_agree(arch):
    V, H = 8, 7
    params = random_params(V, H, np.float64, scale=0.4, **NN_ARCHS[arch])
    ref, fast = NumpyBackend(params), TorchNNBackend(params)
    tokens = np.random.default_rng(3).integers(0, V, 300)
    X, Y = random_batch(V, 3, 6)
    state = random_state(ref.arch.num_state_slices, 3, H, scale=0.3)
    n1, s1 = ref.token_nll(X, Y, state)
    n2, s2 = fast.token_nll(X, Y, torch.tensor(state))
    assert n2.dtype == np.float64 and rel_err(n1, n2) < 1e-12 and rel_err(s1, as_np(s2)) < 1e-12
    a, b = evaluate.score_stream(ref, tokens, chunk=64), evaluate.score_stream(fast, tokens, chunk=100)
    assert a["tokens"] == b["tokens"] == 299 and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-10)
    assert fast.begin_state(2).shape == (ref.arch.num_state_slices, 2, H)
    outs = [decoding.generate(bk.decoder(), bk.begin_state(2), [1, 2], 12) for bk in (ref, fast)]
    np.testing.assert_array_equal(*outs)
    sampled = [decoding.generate(bk.decoder(), bk.begin_state(3), [4], 15, temperature=0.8,
                                 rng=np.random.default_rng(9)) for bk in (ref, fast)]
    np.testing.assert_array_equal(*sampled)
    assert_dynamic_evaluation_agrees(ref, fast, tokens)


# ---- choosing the path ----

def test_make_backend_runs_nn_models_on_the_nn_path_and_refuses_book_models():
    nn_params = random_params(5, 4, np.float32, cell="lstm", num_layers=2, cell_variant="nn")
    auto = make_backend("torch", nn_params)
    assert type(auto) is TorchNNBackend and auto.name == "torch-nn" and not auto.autocast
    assert make_backend("torch", nn_params, torch_impl="nn", matmul_dtype="bfloat16").autocast
    assert make_backend("torch", nn_params, torch_impl="autograd").name == "torch-autograd"
    with pytest.raises(RnnlabError, match="it can run on: fused, autograd, compile$"):
        make_backend("torch", random_params(5, 4, np.float32), torch_impl="nn")
    with pytest.raises(RnnlabError, match="--cell-variant nn.*it can run on: fused, autograd, compile$"):
        make_backend("torch", random_params(5, 4, np.float32, cell="gru"), torch_impl="nn")


# ---- runs and checkpoints through the real API ----

DATA_CFG = DataConfig(max_tokens=400)
BASE = TrainConfig(batch_size=4, num_steps=5, num_epochs=3, log_every=1, backend="torch", torch_impl="nn",
                   num_preds=3, theta=0.05, lr=0.5)       # theta small enough that clipping fires at every step
MODEL = ModelConfig(cell="lstm", cell_variant="nn", num_hiddens=8)
PATHS = {"torch-nn": dict(backend="torch", torch_impl="nn"), "numpy": dict(backend="numpy"),
         "torch-autograd": dict(backend="torch", torch_impl="autograd")}


@pytest.fixture
def corpus(monkeypatch):
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    monkeypatch.setattr(train, "_plot", lambda *args: None)        # the plot is not what these tests test


def quiet_fit(run, out):
    train.fit(run, out, progress=False, log=lambda s: None)


@pytest.mark.parametrize("optimizer", [dict(optimizer="sgd"), dict(optimizer="adam", lr=0.01)])
def test_resume_is_bit_exact_while_clipping_fires(tmp_path, monkeypatch, corpus, optimizer):
    cfg = dataclasses.replace(BASE, **optimizer)
    straight = train.new_run(DATA_CFG, MODEL, cfg)
    quiet_fit(straight, tmp_path / "straight")
    half = train.new_run(DATA_CFG, MODEL, dataclasses.replace(cfg, num_epochs=1))
    quiet_fit(half, tmp_path / "split")
    monkeypatch.setattr(checkpoint, "load", reversed_load(checkpoint.load))     # the weights in another order
    resumed = train.resume_run(tmp_path / "split", train={"num_epochs": 3})
    assert resumed.backend.name == "torch-nn"
    quiet_fit(resumed, tmp_path / "split")
    records = train.read_metrics(tmp_path / "split")
    assert all(r["clip_frac"] > 0 and r["backend"] == "torch-nn" for r in records)
    a, b = straight.backend.numpy_params(), resumed.backend.numpy_params()
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert [r["val_ppl"] for r in records] == [r["val_ppl"] for r in train.read_metrics(tmp_path / "straight")]


@pytest.mark.parametrize("first, then", [("torch-nn", "numpy"), ("torch-nn", "torch-autograd"),
                                         ("numpy", "torch-nn"), ("torch-autograd", "torch-nn")])
def test_checkpoints_move_between_the_nn_path_and_the_others(tmp_path, corpus, first, then):
    """One epoch on one path, two more on another: the same run (to float32 rounding) as three epochs on
    the first path, and every checkpoint names the path that wrote it."""
    straight = train.new_run(DATA_CFG, MODEL, dataclasses.replace(BASE, **PATHS[first]))
    quiet_fit(straight, None)
    half = train.new_run(DATA_CFG, MODEL, dataclasses.replace(BASE, num_epochs=1, **PATHS[first]))
    quiet_fit(half, tmp_path / "moved")
    assert checkpoint.load(tmp_path / "moved").extra["backend"] == first
    resumed = train.resume_run(tmp_path / "moved", train={"num_epochs": 3, **PATHS[then]})
    assert resumed.backend.name == then
    quiet_fit(resumed, tmp_path / "moved")
    assert checkpoint.load(tmp_path / "moved").extra["backend"] == then
    assert [r["backend"] for r in train.read_metrics(tmp_path / "moved")] == [first, then, then]
    a, b = straight.backend.numpy_params(), resumed.backend.numpy_params()
    for name in a:
        assert rel_err(a[name], b[name]) < 1e-4, name
