"""The reference backend: numpy forward pass and hand-written backpropagation through time.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, S = state slices.
Slow and clear on purpose; every other path is tested against this one. The network (cell, depth, input)
is read from the parameter names (`cells.describe`).
"""
from __future__ import annotations

import numpy as np

from .. import cells, network
from . import masked_params

_PHI = {"tanh": np.tanh, "relu": cells.NumpyOps.relu}


class NumpyBackend:
    name = "numpy"

    def __init__(self, params: dict[str, np.ndarray], activation: str = "tanh", onehot_input: bool = False):
        self.params = {k: np.array(v, copy=True) for k, v in params.items()}
        self.arch = cells.describe(self.params)
        self.activation = activation
        self.phi = _PHI[activation]
        self.onehot_input = onehot_input

    @property
    def dtype(self):
        return self.params["W_hq"].dtype

    def begin_state(self, batch_size: int) -> np.ndarray:
        """The book's `init_rnn_state`: zeros, (S, B, H)."""
        return np.zeros((self.arch.num_state_slices, batch_size, self.arch.num_hiddens), dtype=self.dtype)

    def forward(self, X: np.ndarray, state: np.ndarray, masks=None, keep_cache=False, params=None):
        """X (B, T) indices, state (S, B, H) -> logits (T*B, V), new state (S, B, H), cache; with the
        backend's weights, or `params` in their place."""
        return network.forward(self.params if params is None else params, X, state, self.arch, cells.NumpyOps,
                               self.phi, masks, self.onehot_input, keep_cache)

    def loss_and_grads(self, X: np.ndarray, Y: np.ndarray, state: np.ndarray, masks=None, weight_masks=None):
        """Mean cross-entropy over the T*B predictions, its gradients, and the final state.

        `weight_masks` (weight drop) multiply the named weights for this minibatch only: the loss is that of
        W * M, and the gradient w.r.t. W is M * (the gradient w.r.t. W * M). The stored weights never change."""
        params = masked_params(self.params, weight_masks)
        logits, new_state, cache = self.forward(X, state, masks, keep_cache=True, params=params)
        y = Y.T.reshape(-1)                                   # time-major targets, like the logits
        nll, probs = cells.cross_entropy(logits, y)
        dlogits = probs
        dlogits[np.arange(len(y)), y] -= 1
        dlogits /= len(y)                                     # d mean / d logits = (softmax - onehot) / N
        grads = network.backward(params, X, self.arch, cache, dlogits, self.activation, masks,
                                 self.onehot_input)
        for name, m in (weight_masks or {}).items():
            grads[name] *= m
        return float(nll.mean()), grads, new_state

    def token_nll(self, X: np.ndarray, Y: np.ndarray, state: np.ndarray):
        """Per-prediction NLL (T*B,) in float64, time-major, and the final state; no gradients."""
        logits, new_state, _ = self.forward(X, state)
        nll, _ = cells.cross_entropy(logits.astype(np.float64), Y.T.reshape(-1))
        return nll, new_state

    def step(self, token_ids: np.ndarray, state: np.ndarray):
        """One decoding step (a `generate` callback) from the current weights."""
        logits, new_state, _ = self.forward(np.asarray(token_ids).reshape(-1, 1), state)
        return logits, new_state

    def decoder(self):
        """A `generate` step callback. For the book's RNN the table W_xh + b_h is built once, when the
        decoder is made, not at every step: valid while the weights do not change (they don't while
        generating). Other networks decode through `step`."""
        if not self.arch.is_book_rnn:
            return self.step
        p, phi = self.params, self.phi
        W_hh, W_hq, b_q = p["W_hh"], p["W_hq"], p["b_q"]
        XW_b = p["W_xh"] + p["b_h"]

        def step(token_ids, state):
            H = phi(XW_b[token_ids] + state[0] @ W_hh)                          # (B, H)
            return H @ W_hq + b_q, H[None]                                      # (B, V) logits
        return step

    def update(self, fn) -> None:
        """Apply an update: the parameters become fn(parameters) (an optimizer step, a dynamic-evaluation
        step); callers never change the backend's arrays themselves."""
        self.params = dict(fn(self.params))

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}
