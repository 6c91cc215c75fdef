"""Small builders shared by the tests."""
import numpy as np

from rnnlab import cells


def random_params(V=5, H=4, dtype=np.float64, scale=0.5, seed=0):
    """Parameters large enough that the nonlinearity and every gradient path matter."""
    rng = np.random.default_rng(seed)
    params = cells.init_params(V, H, rng, dtype)
    return {k: (rng.standard_normal(v.shape) * scale).astype(dtype) for k, v in params.items()}


def random_batch(V=5, B=2, T=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), 1e-30))
