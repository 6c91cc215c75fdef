"""Small builders shared by the tests."""
import numpy as np

from rnnlab import cells


def random_params(V=5, H=4, dtype=np.float64, scale=0.5, seed=0, **arch):
    """Parameters large enough that the nonlinearity and every gradient path matter. `arch` takes
    init_params' cell, num_layers and embed_size."""
    rng = np.random.default_rng(seed)
    params = cells.init_params(V, H, rng, dtype, **arch)
    return {k: (rng.standard_normal(v.shape) * scale).astype(dtype) for k, v in params.items()}


def random_batch(V=5, B=2, T=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), 1e-30))


# networks beyond the book's RNN, as init_params keywords: every cell, depth and input kind
ARCHS = {
    "rnn-2layer-embed": dict(cell="rnn", num_layers=2, embed_size=3),
    "gru": dict(cell="gru"),
    "gru-2layer-embed": dict(cell="gru", num_layers=2, embed_size=3),
    "lstm": dict(cell="lstm"),
    "lstm-2layer-embed": dict(cell="lstm", num_layers=2, embed_size=3),
    "lstm-3layer": dict(cell="lstm", num_layers=3),
    # torch.nn's form: two biases per gate, the GRU's reset gate after its recurrent matmul
    "rnn-nn": dict(cell="rnn", cell_variant="nn"),
    "gru-nn": dict(cell="gru", cell_variant="nn"),
    "gru-nn-2layer-embed": dict(cell="gru", num_layers=2, embed_size=3, cell_variant="nn"),
    "lstm-nn-2layer": dict(cell="lstm", num_layers=2, cell_variant="nn"),
}


def random_state(S, B, H, dtype=np.float64, seed=2, scale=0.5):
    """A carried (non-zero) state (S, B, H)."""
    return (np.random.default_rng(seed).standard_normal((S, B, H)) * scale).astype(dtype)
