"""Clipping, SGD, momentum, Adam, AdamW and schedules, against hand-computed values and torch.optim."""
import numpy as np
import pytest

from rnnlab import optim


def grads_with_norm_5():
    return {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}     # sqrt(9 + 16) = 5


def test_clip_scales_to_theta_when_norm_exceeds_it():
    given = grads_with_norm_5()
    g, norm, clipped = optim.clip_grad_norm(given, 1.0)
    assert given["a"].tolist() == [3.0, 0.0]          # new arrays: the caller's are untouched
    assert norm == 5.0 and clipped
    np.testing.assert_allclose(g["a"], [0.6, 0.0])
    np.testing.assert_allclose(g["b"], [[0.8]])
    assert optim.grad_norm(g) == pytest.approx(1.0)


@pytest.mark.parametrize("theta", [0.0, 5.0, 7.5])
def test_no_clip_when_off_or_within_theta(theta):
    g = grads_with_norm_5()
    g, norm, clipped = optim.clip_grad_norm(g, theta)
    assert norm == 5.0 and not clipped
    np.testing.assert_array_equal(g["a"], [3.0, 0.0])


def test_sgd_returns_new_parameters_and_changes_nothing():
    p = {"a": np.array([1.0, 2.0]), "b": np.array([[0.5]])}
    new = optim.sgd(p, grads_with_norm_5(), lr=0.5)
    np.testing.assert_array_equal(p["a"], [1.0, 2.0])                 # the backend applies the result
    np.testing.assert_allclose(new["a"], [-0.5, 2.0])
    np.testing.assert_allclose(new["b"], [[-1.5]])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_a_step_changes_no_array_in_place(name):
    """Parameters, gradients and the previous buffers are left as they were: the same code can serve
    immutable arrays."""
    opt = optim.make_optimizer(name, weight_decay=0.1)
    params, grads = {"W_hh": np.ones((2, 2)), "b_h": np.ones(2)}, {"W_hh": np.full((2, 2), 0.5), "b_h": np.ones(2)}
    for _ in range(2):
        frozen = {k: v.copy() for k, v in params.items()}
        buffers = [b.copy() for b in opt.buffer_arrays()]
        old_buffers = opt.buffer_arrays()
        new = opt.step(params, grads, 0.1)
        assert all(np.array_equal(params[k], frozen[k]) for k in params)
        assert all(np.array_equal(b, c) for b, c in zip(old_buffers, buffers))
        assert all(not np.array_equal(new[k], params[k]) for k in params)
        params = new


@pytest.mark.parametrize("name, weight_decay", [("momentum", 0.0), ("momentum", 0.1), ("adam", 0.0),
                                                ("adamw", 0.1)])
def test_optimizers_match_torch_optim(name, weight_decay):
    """Three updates of rnnlab's optimizer on numpy arrays equal torch.optim's on the same gradients
    (weight decay on a weight matrix, as rnnlab applies it to W_* only)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(3)]
    ours = {"W_hh": W.copy()}
    opt = optim.make_optimizer(name, weight_decay=weight_decay, momentum=0.8)
    ref = torch.tensor(W, requires_grad=True)
    classes = {"momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, weight_decay=weight_decay),
               "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=weight_decay),
               "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=weight_decay)}
    torch_opt = classes[name]([ref])
    for g in grads:
        ours = opt.step(ours, {"W_hh": g.copy()}, 0.05)
        ref.grad = torch.tensor(g)
        torch_opt.step()
        np.testing.assert_allclose(ours["W_hh"], ref.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_weight_decay_skips_biases():
    opt = optim.make_optimizer("sgd", weight_decay=0.5)
    params = {"W_xh": np.ones(2), "b_h": np.ones(2)}
    params = opt.step(params, {"W_xh": np.zeros(2), "b_h": np.zeros(2)}, 1.0)
    assert params["W_xh"].tolist() == [0.5, 0.5] and params["b_h"].tolist() == [1.0, 1.0]


def test_clip_by_value_clips_each_element():
    grads = {"a": np.array([3.0, -0.2]), "b": np.array([-5.0])}
    grads, norm, clipped = optim.clip(grads, 1.0, "value")
    assert clipped and norm == pytest.approx(np.sqrt(9 + 0.04 + 25))
    assert grads["a"].tolist() == [1.0, -0.2] and grads["b"].tolist() == [-1.0]
    assert optim.clip({"a": np.array([0.5])}, 1.0, "value")[2] is False


def test_schedules():
    assert optim.lr_at(1.0, 0.5, 10, "constant", warmup_epochs=2) == pytest.approx(0.25)
    assert optim.lr_at(1.0, 2.0, 10, "cosine", warmup_epochs=2) == pytest.approx(1.0)
    assert optim.lr_at(1.0, 6.0, 10, "cosine", warmup_epochs=2) == pytest.approx(0.5)
    assert optim.lr_at(1.0, 10.0, 10, "cosine") == pytest.approx(0.0)
    assert optim.lr_at(1.0, 25.0, 100, "step", step_size=10, gamma=0.5) == pytest.approx(0.25)
