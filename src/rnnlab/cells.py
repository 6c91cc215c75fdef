"""The recurrence, written once: parameters, the forward step, the output layer, the loss, and the
hand-written backward pass used by the numpy reference.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

The forward functions use only `@`, `+`, indexing and an activation passed in, so the same code runs on
numpy arrays (the reference backend) and torch tensors (autograd differentiates it). Parameters are a flat
dict with the book's names:

    H_t = phi(X_t W_xh + H_{t-1} W_hh + b_h)     W_xh (V, H), W_hh (H, H), b_h (H,)
    O_t = H_t W_hq + b_q                         W_hq (H, V), b_q (V,)

X_t is a one-hot row, so X_t W_xh is row x_t of W_xh: gathering rows equals the book's one-hot matmul.
"""
from __future__ import annotations

import numpy as np

PARAM_NAMES = ("W_xh", "W_hh", "b_h", "W_hq", "b_q")


def param_shapes(vocab_size: int, num_hiddens: int) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter, by name."""
    V, H = vocab_size, num_hiddens
    return {"W_xh": (V, H), "W_hh": (H, H), "b_h": (H,), "W_hq": (H, V), "b_q": (V,)}


def init_params(vocab_size: int, num_hiddens: int, rng: np.random.Generator,
                dtype=np.float32) -> dict[str, np.ndarray]:
    """The book's `get_params`: weights ~ N(0, 0.01^2), biases zero, drawn in the book's order.

    Drawn in float64 and then cast, so every dtype and every backend starts from the same weights.
    """
    def normal(shape):
        return (rng.standard_normal(shape) * 0.01).astype(dtype)

    shapes = param_shapes(vocab_size, num_hiddens)
    # weights drawn in the book's order (W_xh, W_hh, W_hq); biases start at zero
    return {name: normal(shape) if name.startswith("W") else np.zeros(shape, dtype=dtype)
            for name, shape in shapes.items()}


def one_hot(X: np.ndarray, vocab_size: int, dtype=np.float32) -> np.ndarray:
    """(...,) indices -> (..., V) one-hot rows: the book's input encoding."""
    return np.eye(vocab_size, dtype=dtype)[X]


def input_projection(W_xh, X):
    """(B, T) indices -> (T, B, H): X_t W_xh for every step, as a row gather (time-major like the book)."""
    return W_xh[X.T]


def rnn_step(XW_t, H, W_hh, b_h, phi):
    """One step of the recurrence. XW_t (B, H) is the input projection, H (B, H) the previous state."""
    return phi(XW_t + H @ W_hh + b_h)


def output_layer(Hs, W_hq, b_q):
    """(T, B, H) states -> (T*B, V) logits, rows in the book's time-major order."""
    return Hs.reshape(-1, Hs.shape[-1]) @ W_hq + b_q


# ---- numpy only below: the loss and the hand-written backward pass of the reference backend ----

def activation_grad(name: str, H_t: np.ndarray) -> np.ndarray:
    """d phi / d a expressed through the output H_t = phi(a): tanh' = 1 - H^2, relu' = [H > 0]."""
    if name == "tanh":
        return 1 - H_t * H_t
    return (H_t > 0).astype(H_t.dtype)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row negative log-likelihood (N,) and softmax probabilities (N, V), computed stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p = z - log_norm
    return -log_p[np.arange(len(y)), y], np.exp(log_p)


def rnn_backward(params: dict, X: np.ndarray, H0: np.ndarray, Hs: np.ndarray, dlogits: np.ndarray,
                 activation: str, onehot_input: bool = False) -> dict[str, np.ndarray]:
    """Backpropagation through time for one minibatch, truncated at H0 (the state is detached there).

    X (B, T) inputs, H0 (B, H) initial state, Hs (T, B, H) states from the forward pass,
    dlogits (T*B, V) gradient of the loss w.r.t. the logits. Returns gradients named like the parameters.
    """
    T, B, Hn = Hs.shape
    H_flat = Hs.reshape(-1, Hn)                               # (T*B, H)
    grads = {"W_hq": H_flat.T @ dlogits, "b_q": dlogits.sum(axis=0)}
    dHs = (dlogits @ params["W_hq"].T).reshape(T, B, Hn)      # loss -> each H_t through the output layer
    dA = np.empty_like(Hs)                                    # (T, B, H) grads of the pre-activations
    dH_next = np.zeros_like(H0)                               # grad flowing back from step t+1
    W_hh_T = params["W_hh"].T
    for t in reversed(range(T)):
        dA[t] = (dHs[t] + dH_next) * activation_grad(activation, Hs[t])
        dH_next = dA[t] @ W_hh_T
    H_prev = np.concatenate([H0[None], Hs[:-1]]).reshape(-1, Hn)  # (T*B, H): H_{t-1} for every step
    dA_flat = dA.reshape(-1, Hn)
    grads["W_hh"] = H_prev.T @ dA_flat
    grads["b_h"] = dA_flat.sum(axis=0)
    V = params["W_xh"].shape[0]
    if onehot_input:
        grads["W_xh"] = one_hot(X.T.reshape(-1), V, Hs.dtype).T @ dA_flat
    else:
        grads["W_xh"] = np.zeros_like(params["W_xh"])
        np.add.at(grads["W_xh"], X.T.reshape(-1), dA_flat)    # scatter-add: rows that were gathered
    return {name: grads[name] for name in PARAM_NAMES}
