"""The numpy reference's hand-written BPTT against central finite differences, in float64."""
import numpy as np
import pytest

from helpers import ARCHS, random_batch, random_params, random_state, rel_err
from rnnlab import network
from rnnlab.backends.numpy_backend import NumpyBackend


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("onehot_input", [False, True])
def test_bptt_matches_finite_differences(activation, onehot_input):
    V, B, T, H = 5, 3, 4, 4
    backend = NumpyBackend(random_params(V, H), activation, onehot_input)
    X, Y = random_batch(V, B, T)
    X[0, :2] = X[1, 0]                                     # a repeated token: gathered rows must accumulate
    H0 = np.random.default_rng(2).standard_normal((1, B, H)) * 0.5   # a carried (non-zero) state
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
    logits, state, _ = backend.forward(X, backend.begin_state(2))
    y = Y.T.reshape(-1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-12)
    np.testing.assert_array_equal(H_last, state)


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


def numeric_grads(backend, loss_of):
    """Central differences of loss_of() w.r.t. every parameter of `backend`, perturbed in place."""
    eps, out = 1e-6, {}
    for name, p in backend.params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            plus = loss_of()
            p[i] = old - eps
            minus = loss_of()
            p[i] = old
            numeric[i] = (plus - minus) / (2 * eps)
        out[name] = numeric
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_deep_and_gated_bptt_matches_finite_differences(arch, dropout):
    V, B, T, H = 5, 2, 4, 3
    backend = NumpyBackend(random_params(V, H, **ARCHS[arch]))
    a = backend.arch
    X, Y = random_batch(V, B, T)
    X[0, :2] = X[1, 0]                                     # a repeated token: gathered rows must accumulate
    state = random_state(a.num_state_slices, B, H)
    masks = network.dropout_masks(np.random.default_rng(3), dropout, a.num_layers, B, T, H, np.float64)
    _, grads, _ = backend.loss_and_grads(X, Y, state, masks)
    numeric = numeric_grads(backend, lambda: backend.loss_and_grads(X, Y, state, masks)[0])
    assert set(grads) == set(backend.params)
    for name in grads:     # 1e-5: deep layers' gradients are ~1e-4, where differencing noise is ~1e-10
        assert rel_err(grads[name], numeric[name]) < 1e-5, name


def test_the_book_rnn_is_a_one_layer_network_of_the_same_code():
    """The generic stack with one RNN layer is the book's recurrence, step for step."""
    V, B, T, H = 6, 3, 5, 4
    params = random_params(V, H)
    X, _ = random_batch(V, B, T)
    H_t = random_state(1, B, H)[0]
    expected = []
    for t in range(T):
        H_t = np.tanh(params["W_xh"][X[:, t]] + H_t @ params["W_hh"] + params["b_h"])
        expected.append(H_t @ params["W_hq"] + params["b_q"])
    logits, state, _ = NumpyBackend(params).forward(X, random_state(1, B, H))
    np.testing.assert_allclose(logits, np.concatenate(expected), rtol=1e-12)
    np.testing.assert_allclose(state[0], H_t, rtol=1e-12)


@pytest.mark.parametrize("arch", ["gru", "lstm-2layer-embed"])
def test_weight_drop_gradient_matches_finite_differences(arch):
    """With weight drop the loss is L(W_h * M); its gradient w.r.t. W_h is M * dL/d(W_h * M)."""
    V, B, T, H = 5, 2, 4, 3
    backend = NumpyBackend(random_params(V, H, **ARCHS[arch]))
    X, Y = random_batch(V, B, T)
    state = random_state(backend.arch.num_state_slices, B, H)
    weight_masks = network.weight_drop_masks(np.random.default_rng(5), 0.5, backend.arch, np.float64)
    assert set(weight_masks) == set(network.recurrent_weight_names(backend.arch))
    assert "W_hq" not in weight_masks and all((m == 0).any() for m in weight_masks.values())
    before = {k: v.copy() for k, v in backend.params.items()}
    loss, grads, _ = backend.loss_and_grads(X, Y, state, None, weight_masks)
    for k, v in backend.params.items():                    # the stored weights are never touched
        np.testing.assert_array_equal(v, before[k])

    def dropped_loss():
        masked = {k: v * weight_masks[k] if k in weight_masks else v for k, v in backend.params.items()}
        return NumpyBackend(masked).loss_and_grads(X, Y, state)[0]

    assert loss == pytest.approx(dropped_loss(), rel=1e-14)
    numeric = numeric_grads(backend, dropped_loss)
    for name in grads:
        assert rel_err(grads[name], numeric[name]) < 1e-5, name
    for name, m in weight_masks.items():                   # a dropped weight gets no gradient
        assert (grads[name][m == 0] == 0).all()
