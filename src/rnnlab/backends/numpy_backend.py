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
        self._weights = None                    # (params, _Weights): what the decoders share

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
        """A `generate` step callback, a `Decoder`, on weights prepared once for the current parameters (and
        again after an update)."""
        if self._weights is None or self._weights[0] is not self.params:
            self._weights = (self.params, _Weights(self.params, self.arch))
        return Decoder(self._weights[1], self.activation)

    def update(self, fn) -> None:
        """Apply an update: the parameters become fn(parameters) (an optimizer step, a dynamic-evaluation
        step); callers never change the backend's arrays themselves. The decoders' prepared weights are
        for the old parameters: dropped, so they keep no copy alive."""
        self.params = dict(fn(self.params))
        self._weights = None

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}


def _aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """A C-contiguous copy of `a` that starts on an `align`-byte boundary, so that a matrix-vector product
    reads whole cache lines."""
    a = np.asarray(a)
    raw = np.empty(a.nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


SIGMOID_GATES = {"rnn": 0, "gru": 2, "lstm": 3}      # the first gates of each cell, Z R and I F O, are sigmoids


class _Layer:
    """One layer's weights as the decoder multiplies them. A step's new H feeds two products, the recurrence
    of the next step (W_rec: the K columns of W_h* that multiply H itself) and what the layer feeds now
    (W_next: the next layer's W_x*, or W_hq on top, whose bias is `bias_next`); `fused` = [W_rec | W_next]
    computes both in one matmul, and `one`, the same with a last row [0 | bias_next], also adds the bias
    for a single row [H, 1]. For a batch, one matmul is faster where W_next is narrow (the output layer of
    a character model), two where it is as wide as W_rec (the next layer's gates), as measured here. The
    book's GRU keeps its candidate's W_hh apart (`W_cand`): it multiplies R * H, known only in the step; the
    nn GRU adds its recurrent-side bias `b_rec` to the recurrent product."""

    def __init__(self, W_h, W_next, bias_next, cell: str, b_rec=None):
        H, dtype = W_h.shape[0], W_h.dtype
        book_gru = cell == "gru" and b_rec is None
        rec = W_h[:, :2 * H] if book_gru else W_h
        self.K = rec.shape[1]
        self.W_rec, self.W_next, self.bias_next = _aligned(rec), _aligned(W_next), bias_next
        self.fused = _aligned(np.concatenate([rec, W_next], axis=1))
        self.narrow = W_next.shape[1] * 4 <= self.K          # a batch's step fuses only a narrow W_next
        last_row = np.concatenate([np.zeros(self.K, dtype), bias_next])
        self.one = _aligned(np.concatenate([self.fused, last_row[None]]))
        self.W_cand = _aligned(W_h[:, 2 * H:]) if book_gru else None
        self.b_rec = b_rec


class _Weights:
    """Everything a decoder precomputes from the parameters, once; shared by the decoders of one backend
    (read only). Layer 1's input projection with its biases is a table (V, G*H) indexed by token: the rows
    of W_x* + b_* for one-hot input, W_emb @ W_x* + b_* with an embedding. The nn variant's recurrent-side
    bias is folded into the input biases too, except for the GRU, where it belongs to the recurrent product.
    The weights and biases of the sigmoid gates are halved (exactly: a power of two), so that one tanh gives
    sigmoid(a) = 0.5 tanh(a / 2) + 0.5, and the LSTM's four gates one tanh call.

    `bounded`, for one tanh RNN layer: the weights are finite and so small that from a state within [-2, 2]
    no logit can be infinite or NaN (H stays in [-1, 1], so every product is at most its column's absolute
    sum, rounding included)."""

    def __init__(self, params: dict, arch: cells.Arch):
        self.arch, self.dtype = arch, params["W_hq"].dtype
        weights = [cells.layer_weights(params, arch, layer, cells.NumpyOps) for layer in range(arch.num_layers)]
        half = np.ones(len(cells.GATES[arch.cell]) * arch.num_hiddens, self.dtype)
        half[:SIGMOID_GATES[arch.cell] * arch.num_hiddens] = 0.5
        weights = [tuple(None if w is None else w * half for w in layer) for layer in weights]
        folds = arch.variant == "nn" and arch.cell != "gru"
        biases = [b + b_rec if folds else b for _, _, b, b_rec in weights]
        W_x = weights[0][0]
        self.table = _aligned((params["W_emb"] @ W_x if arch.embed_size else W_x) + biases[0])
        self.rows = list(self.table)
        self.layers = []
        for layer, (_, W_h, _, b_rec) in enumerate(weights):
            top = layer + 1 == arch.num_layers
            W_next, bias_next = (params["W_hq"], params["b_q"]) if top else (weights[layer + 1][0], biases[layer + 1])
            self.layers.append(_Layer(W_h, W_next, bias_next, arch.cell, b_rec if arch.cell == "gru" else None))
        self.bounded = False
        if arch.cell == "rnn" and arch.num_layers == 1:
            one, table = self.layers[0].one, self.table
            if np.isfinite(one).all() and np.isfinite(table).all():
                largest = 2.02 * np.abs(one.astype(np.float64)).sum(axis=0).max() + np.abs(table).max()
                self.bounded = bool(largest < np.finfo(self.dtype).max / 4)


def _sigmoid_half_(a: np.ndarray) -> np.ndarray:
    """sigmoid(2 a) in place, for the halved pre-activations of a sigmoid gate: 0.5 tanh(a) + 0.5."""
    np.tanh(a, out=a)
    np.multiply(a, 0.5, out=a)
    np.add(a, 0.5, out=a)
    return a


class Decoder:
    """The numpy backend's decoding step, `step(token_ids (B,), state (S, B, H)) -> (logits (B, V), state)`,
    computed from weights prepared once (`_Weights`), with `greedy`, a loop for one continuation.

    Each step ends with the products of each layer's new H: with W_rec, the next step's recurrent product,
    carried in the decoder for the state it returned last (or a copy of it), and with W_next, the next
    layer's input or the logits; one matmul H @ [W_rec | W_next] where that is faster (`_Layer`). A state
    the decoder did not make (a prompt's state copied to every row, beams reordered) has its recurrent
    product computed; while states keep arriving that way (beam search) a batch's step multiplies only
    W_next. A batch of one row always goes through the same aligned buffers and the same products
    (`_Layer.one`), in a call and in `greedy` alike, so the two give the same bits. The returned state and
    logits are fresh arrays, never changed afterwards."""

    def __init__(self, weights: _Weights, activation: str = "tanh"):
        self.w, self.arch = weights, weights.arch
        self.relu = activation == "relu"
        dt = weights.dtype
        self._hb = [_aligned(np.ones(layer.W_rec.shape[0] + 1, dt)) for layer in weights.layers]   # [H, 1]
        self._out = [_aligned(np.zeros(layer.one.shape[1], dt)) for layer in weights.layers]
        self._rec = [_aligned(np.zeros(layer.K, dt)) for layer in weights.layers]
        self._last, self._carried = None, None

    def _phi(self, a, out):
        return np.maximum(a, 0, out=out) if self.relu else np.tanh(a, out=out)

    # --- the products -------------------------------------------------------------------------------------

    def _one(self, layer: int, h, W):
        """h (H,) @ W through the layer's aligned buffers: W is the layer's W_rec, or `one` ([h, 1] @ one)."""
        hb = self._hb[layer]
        np.copyto(hb[:-1], h)
        if W is self.w.layers[layer].W_rec:
            return np.dot(hb[:-1], W, out=self._rec[layer])
        return np.dot(hb, W, out=self._out[layer])

    def _recurrent(self, state) -> tuple[list, bool]:
        """Every layer's recurrent product for `state`, and whether to carry the next one (fuse). The carried
        products serve the state last returned, or a copy of it (equal values: the same products)."""
        last = self._last
        known = state is last or (last is not None and state.shape == last.shape and np.array_equal(state, last))
        if known and self._carried is not None:
            return self._carried, True
        B = state.shape[1]
        products = [self._one(layer, state[layer, 0], w.W_rec)[None].copy() if B == 1 else state[layer] @ w.W_rec
                    for layer, w in enumerate(self.w.layers)]
        return products, known or B == 1

    # --- a step -------------------------------------------------------------------------------------------

    def __call__(self, token_ids, state):
        tokens = np.asarray(token_ids).reshape(-1)
        carried, fuse = self._recurrent(state)
        L, B = self.arch.num_layers, len(tokens)
        new = np.empty(state.shape, self.w.dtype)
        y, products = None, []
        for layer, w in enumerate(self.w.layers):
            x = self.w.table[tokens] if layer == 0 else y
            self._cell(w, x, carried[layer], state, new, layer, L)
            h = new[layer]
            if B == 1:
                out = self._one(layer, h[0], w.one)[None].copy()           # the bias is in `one`
                y, product = out[:, w.K:], out[:, :w.K]
            elif not fuse:
                y, product = h @ w.W_next + w.bias_next, None
            elif w.narrow:
                out = h @ w.fused
                y, product = out[:, w.K:] + w.bias_next, out[:, :w.K]
            else:
                y, product = h @ w.W_next + w.bias_next, h @ w.W_rec
            products.append(product)
        self._last, self._carried = new, products if fuse else None
        return y, new

    def _cell(self, w: _Layer, x, rec, state, new, layer: int, L: int) -> None:
        """One layer's cell, as `cells.step` computes it, into new[layer] (and the LSTM's C into new[L + layer]);
        x (B, G*H) is the input projection with its biases (a scratch array), rec the recurrent product."""
        cell, H = self.arch.cell, self.arch.num_hiddens
        if cell == "rnn":
            np.add(x, rec, out=x)
            self._phi(x, new[layer])
            return
        if cell == "lstm":
            np.add(x, rec, out=x)
            np.tanh(x, out=x)                                     # the gates I F O halved, C~ whole
            IFO = x[:, :3 * H]
            np.multiply(IFO, 0.5, out=IFO)
            np.add(IFO, 0.5, out=IFO)
            I, F, O, C_tilde = IFO[:, :H], IFO[:, H:2 * H], IFO[:, 2 * H:], x[:, 3 * H:]
            C = np.multiply(F, state[L + layer], out=new[L + layer])
            C += np.multiply(I, C_tilde, out=I)
            tanh_C = np.tanh(C, out=C_tilde)
            np.multiply(O, tanh_C, out=new[layer])
            return
        H_prev = state[layer]
        if w.b_rec is not None:                                   # nn.GRU: reset after the recurrent product
            HW = rec + w.b_rec
            ZR = _sigmoid_half_(np.add(x[:, :2 * H], HW[:, :2 * H], out=x[:, :2 * H]))
            R = ZR[:, H:]
            H_tilde = x[:, 2 * H:]
            H_tilde += R * HW[:, 2 * H:]
        else:
            ZR = _sigmoid_half_(np.add(x[:, :2 * H], rec, out=x[:, :2 * H]))
            R = ZR[:, H:]
            RH = R * H_prev
            H_tilde = x[:, 2 * H:]
            H_tilde += np.dot(RH[0], w.W_cand)[None] if len(RH) == 1 else RH @ w.W_cand
        np.tanh(H_tilde, out=H_tilde)
        Z = ZR[:, :H]
        new_H = np.multiply(Z, H_prev, out=new[layer])
        new_H += (1 - Z) * H_tilde

    # --- one continuation, greedy ---------------------------------------------------------------------------

    def greedy(self, feed, state, num_preds: int, never=()):
        """Feed the tokens `feed` (a prompt, or the last token chosen), then choose `num_preds` tokens, each
        the argmax of its logits with the `never` tokens left out, each fed back but the last. Returns the
        tokens (n,), their logits (n, V) and the state: bit for bit what batch-1 calls of this decoder give.
        The logits are None where they cannot be infinite or NaN (`_Weights.bounded`): nothing to check."""
        feed = [int(t) for t in np.asarray(feed).reshape(-1)]
        never = tuple(sorted({int(t) for t in never}))
        if self.arch.cell == "rnn" and self.arch.num_layers == 1:
            return self._greedy_rnn(feed, state, num_preds, never)
        from ..decoding import greedy_steps                       # the generic loop, over this decoder's steps
        return greedy_steps(self, feed, state, num_preds, never)

    def _greedy_rnn(self, feed, state, num_preds: int, never):
        """`greedy` for one RNN layer, its step written out over the decoder's buffers: per token, a row of
        the table, an add, phi, one matrix-vector product [H, 1] @ `one`, and the argmax."""
        w = self.w.layers[0]
        rows, one = self.w.rows, w.one
        carried, _ = self._recurrent(state)
        rec = carried[0][0]
        hb, out = self._hb[0], self._out[0]
        h, a = hb[:-1], np.empty(hb.shape[0] - 1, self.w.dtype)
        rec_next, raw = out[:w.K], out[w.K:]
        add, dot, ninf = np.add, np.dot, -np.inf
        phi = np.tanh if not self.relu else self._phi
        for tok in feed[:-1]:
            add(rows[tok], rec, out=a)
            phi(a, out=h)
            dot(hb, one, out=out)
            rec = rec_next
        V = raw.shape[0]
        checked = not (self.w.bounded and not self.relu and len(never) < V and np.abs(state).max() <= 2)
        logits = np.empty((num_preds, V), self.w.dtype) if checked else None
        tok, ids = feed[-1], []
        append = ids.append
        for i in range(num_preds):
            add(rows[tok], rec, out=a)
            phi(a, out=h)
            dot(hb, one, out=out)
            rec = rec_next
            if checked:
                logits[i] = raw
            for t in never:
                raw[t] = ninf
            tok = raw.argmax()
            append(tok)
        if len(feed) + num_preds == 1:                    # nothing fed: the state is the one given
            return np.array(ids, dtype=np.int64), logits, state
        new = np.empty(state.shape, self.w.dtype)
        new[0, 0] = h
        self._last, self._carried = new, [rec.copy()[None]]
        return np.array(ids, dtype=np.int64), logits, new
