"""The reference backend: numpy forward pass and hand-written backpropagation through time.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.
Slow and clear on purpose; every other path is tested against this one.
"""
from __future__ import annotations

import numpy as np

from .. import cells

_PHI = {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0)}


class NumpyBackend:
    name = "numpy"

    def __init__(self, params: dict[str, np.ndarray], activation: str = "tanh", onehot_input: bool = False):
        self.params = {k: np.array(v, copy=True) for k, v in params.items()}
        self.activation = activation
        self.phi = _PHI[activation]
        self.onehot_input = onehot_input

    @property
    def dtype(self):
        return self.params["W_hh"].dtype

    def begin_state(self, batch_size: int) -> np.ndarray:
        """The book's `init_rnn_state`: zeros (B, H)."""
        return np.zeros((batch_size, self.params["W_hh"].shape[0]), dtype=self.dtype)

    def forward(self, X: np.ndarray, H: np.ndarray):
        """X (B, T) indices, H (B, H) -> logits (T*B, V), all states Hs (T, B, H)."""
        p = self.params
        if self.onehot_input:
            XW = cells.one_hot(X.T, p["W_xh"].shape[0], self.dtype) @ p["W_xh"]  # (T, B, V) @ (V, H)
        else:
            XW = cells.input_projection(p["W_xh"], X)                            # (T, B, H)
        Hs = np.empty(XW.shape, dtype=self.dtype)
        for t in range(X.shape[1]):
            H = cells.rnn_step(XW[t], H, p["W_hh"], p["b_h"], self.phi)
            Hs[t] = H
        return cells.output_layer(Hs, p["W_hq"], p["b_q"]), Hs

    def loss_and_grads(self, X: np.ndarray, Y: np.ndarray, state: np.ndarray):
        """Mean cross-entropy over the T*B predictions, its gradients, and the final state."""
        logits, Hs = self.forward(X, state)
        y = Y.T.reshape(-1)                                   # time-major targets, like the logits
        nll, probs = cells.cross_entropy(logits, y)
        dlogits = probs
        dlogits[np.arange(len(y)), y] -= 1
        dlogits /= len(y)                                     # d mean / d logits = (softmax - onehot) / N
        grads = cells.rnn_backward(self.params, X, state, Hs, dlogits, self.activation, self.onehot_input)
        return float(nll.mean()), grads, Hs[-1]

    def nll(self, X: np.ndarray, Y: np.ndarray, state: np.ndarray):
        logits, Hs = self.forward(X, state)
        nll, _ = cells.cross_entropy(logits.astype(np.float64), Y.T.reshape(-1))
        return float(nll.sum()), Hs[-1]

    def step(self, token_ids: np.ndarray, state: np.ndarray):
        """One decoding step (a `generate` callback) from the current weights."""
        return self.decoder(add_bias_once=False)(token_ids, state)

    def decoder(self, add_bias_once: bool = True):
        """A `generate` step callback. With `add_bias_once`, the table W_xh + b_h is built when the decoder
        is made, not at every step: valid while the weights do not change (they don't while generating)."""
        p, phi = self.params, self.phi
        W_hh, W_hq, b_q = p["W_hh"], p["W_hq"], p["b_q"]
        XW_b = p["W_xh"] + p["b_h"] if add_bias_once else None

        def step(token_ids, H):
            XW = XW_b[token_ids] if XW_b is not None else p["W_xh"][token_ids] + p["b_h"]
            H = phi(XW + H @ W_hh)                                              # (B, H)
            return H @ W_hq + b_q, H                                            # (B, V) logits
        return step

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}
