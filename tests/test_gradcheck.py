"""The numpy reference's hand-written BPTT against central finite differences, in float64."""
import numpy as np
import pytest

from helpers import random_batch, random_params, rel_err
from rnnlab.backends.numpy_backend import NumpyBackend


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("onehot_input", [False, True])
def test_bptt_matches_finite_differences(activation, onehot_input):
    V, B, T, H = 5, 3, 4, 4
    backend = NumpyBackend(random_params(V, H), activation, onehot_input)
    X, Y = random_batch(V, B, T)
    X[0, :2] = X[1, 0]                                     # a repeated token: gathered rows must accumulate
    H0 = np.random.default_rng(2).standard_normal((B, H)) * 0.5   # a carried (non-zero) state
    loss, grads, _ = backend.loss_and_grads(X, Y, H0)
    eps = 1e-6
    for name, p in backend.params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            plus = backend.loss_and_grads(X, Y, H0)[0]
            p[i] = old - eps
            minus = backend.loss_and_grads(X, Y, H0)[0]
            p[i] = old
            numeric[i] = (plus - minus) / (2 * eps)
        assert rel_err(grads[name], numeric) < 1e-6, name
    assert np.isfinite(loss)


def test_loss_is_mean_cross_entropy():
    V = 5
    backend = NumpyBackend(random_params(V, 4))
    X, Y = random_batch(V, 2, 3)
    loss, _, H_last = backend.loss_and_grads(X, Y, backend.begin_state(2))
    logits, Hs = backend.forward(X, backend.begin_state(2))
    y = Y.T.reshape(-1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-12)
    np.testing.assert_array_equal(H_last, Hs[-1])


def test_gather_equals_onehot_matmul():
    params = random_params(7, 6)
    X, Y = random_batch(7, 4, 5)
    gather, onehot = NumpyBackend(params), NumpyBackend(params, onehot_input=True)
    H0 = gather.begin_state(4)
    lg, gg, _ = gather.loss_and_grads(X, Y, H0)
    lo, go, _ = onehot.loss_and_grads(X, Y, H0)
    assert lg == pytest.approx(lo, rel=1e-13)
    for name in gg:
        assert rel_err(gg[name], go[name]) < 1e-13
