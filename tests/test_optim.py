"""Clipping by global norm and SGD against hand-computed values."""
import numpy as np
import pytest

from rnnlab import optim


def grads_with_norm_5():
    return {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}     # sqrt(9 + 16) = 5


def test_clip_scales_to_theta_when_norm_exceeds_it():
    g = grads_with_norm_5()
    norm, clipped = optim.clip_grad_norm(g, 1.0)
    assert norm == 5.0 and clipped
    np.testing.assert_allclose(g["a"], [0.6, 0.0])
    np.testing.assert_allclose(g["b"], [[0.8]])
    assert optim.grad_norm(g) == pytest.approx(1.0)


@pytest.mark.parametrize("theta", [0.0, 5.0, 7.5])
def test_no_clip_when_off_or_within_theta(theta):
    g = grads_with_norm_5()
    norm, clipped = optim.clip_grad_norm(g, theta)
    assert norm == 5.0 and not clipped
    np.testing.assert_array_equal(g["a"], [3.0, 0.0])


def test_sgd_updates_in_place():
    p = {"a": np.array([1.0, 2.0]), "b": np.array([[0.5]])}
    before = p["a"]
    optim.sgd(p, grads_with_norm_5(), lr=0.5)
    assert p["a"] is before                                           # in place: backends keep their arrays
    np.testing.assert_allclose(p["a"], [-0.5, 2.0])
    np.testing.assert_allclose(p["b"], [[-1.5]])
