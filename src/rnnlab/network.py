"""A stack of cells over a token sequence: the forward pass (numpy or torch) and the numpy backward pass.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, I = a layer's input width,
G = gates per cell, L = num_layers, S = state slices (L; 2L for the LSTM: H of every layer, then C).

    tokens (B, T) -> [W_emb lookup, or one-hot rows of W_x*] -> layer 1 -> dropout -> ... -> layer L
                  -> dropout -> output layer -> logits (T*B, V), time-major like the book

Dropout acts only between layers and before the output layer, never on the recurrent connections
(Zaremba et al., 2014). Its masks come from the caller, already scaled by 1 / (1 - p): the training loop
draws them from the run's seeded generator, so a run resumes exactly and every backend sees the same masks.
"""
from __future__ import annotations

import numpy as np

from . import cells


def split_state(state, arch: cells.Arch, layer: int) -> tuple:
    """The (H,) or (H, C) slices of one layer from a state (S, B, H)."""
    if arch.cell == "lstm":
        return state[layer], state[arch.num_layers + layer]
    return (state[layer],)


def join_state(finals: list[tuple], ops):
    """Per-layer (H,) / (H, C) tuples -> a state (S, B, H): every H first, then every C."""
    return ops.stack([f[0] for f in finals] + [f[1] for f in finals if len(f) > 1])


def forward(params: dict, X, state, arch: cells.Arch, ops, phi, masks=None, onehot_input=False,
            keep_cache=False):
    """X (B, T) token ids, state (S, B, H) -> logits (T*B, V), new state (S, B, H) and, with `keep_cache`,
    what `backward` needs. `masks` is None or (L, T, B, H) dropout masks."""
    inputs, finals, caches = None, [], []
    for layer in range(arch.num_layers):
        W_x, W_h, b, b_rec = cells.layer_weights(params, arch, layer, ops)
        if layer > 0:
            XW = inputs @ W_x + b                                   # (T, B, H) @ (H, G*H)
        elif arch.embed_size:
            inputs = params["W_emb"][X.T]                          # (T, B, E)
            XW = inputs @ W_x + b
        elif onehot_input:                                          # the book's literal one-hot matmul
            XW = ops.one_hot(X.T, W_x.shape[0], W_x) @ W_x + b
        else:
            XW = W_x[X.T] + b                                       # (T, B, G*H): gathered rows
        layer_state = split_state(state, arch, layer)
        outputs, layer_caches = [], []
        for XW_t in ops.unbind(XW):     # torch: unbind, not XW[t], whose backward zero-fills XW per step
            layer_state, cache = cells.step(arch.cell, XW_t, layer_state, W_h, ops, phi, b_rec)
            outputs.append(layer_state[0])
            if keep_cache:
                layer_caches.append(cache)
        finals.append(layer_state)
        Hs = ops.stack(outputs)                                     # (T, B, H)
        if keep_cache:
            caches.append({"inputs": inputs, "Hs": Hs, "steps": layer_caches})
        inputs = Hs * masks[layer] if masks is not None else Hs
    logits = cells.output_layer(inputs, params["W_hq"], params["b_q"])
    return logits, join_state(finals, ops), {"layers": caches, "top": inputs} if keep_cache else None


def backward(params: dict, X: np.ndarray, arch: cells.Arch, cache: dict, dlogits: np.ndarray,
             activation: str, masks=None, onehot_input=False) -> dict[str, np.ndarray]:
    """Backpropagation through time and through the layers for one minibatch, truncated at the initial
    state (detached there). dlogits (T*B, V) is the gradient of the loss w.r.t. the logits."""
    top = cache["top"]
    T, B, Hn = top.shape
    grads = {"W_hq": top.reshape(-1, Hn).T @ dlogits, "b_q": dlogits.sum(axis=0)}
    d_out = (dlogits @ params["W_hq"].T).reshape(T, B, Hn)          # loss -> the top layer's outputs
    for layer in reversed(range(arch.num_layers)):
        if masks is not None:
            d_out = d_out * masks[layer]
        W_x, W_h, _, b_rec = cells.layer_weights(params, arch, layer, cells.NumpyOps)
        nn_variant = b_rec is not None        # two biases; the GRU resets after its matmul
        layer_cache = cache["layers"][layer]
        dA, dR = _through_time(arch.cell, layer_cache["steps"], d_out, W_h, activation, nn_variant)
        dA_flat, dR_flat = dA.reshape(T * B, -1), dR.reshape(T * B, -1)             # (T*B, G*H)
        dW_h = np.zeros_like(W_h)
        for recurrent, cols in cells.recurrent_inputs(arch.cell, layer_cache["steps"], nn_variant):
            dW_h[:, cols] = recurrent.reshape(T * B, Hn).T @ dR_flat[:, cols]
        inputs = layer_cache["inputs"]
        if inputs is not None:                                      # a layer above 1, or an embedding
            dW_x = inputs.reshape(T * B, -1).T @ dA_flat
            d_out = dA @ W_x.T                                      # (T, B, I): to the layer below
        elif onehot_input:
            dW_x = cells.one_hot(X.T.reshape(-1), W_x.shape[0], dA.dtype).T @ dA_flat
        else:
            dW_x = np.zeros_like(W_x)
            np.add.at(dW_x, X.T.reshape(-1), dA_flat)              # scatter-add: rows that were gathered
        db_rec = dR_flat.sum(axis=0) if nn_variant else None
        grads.update(cells.split_layer_grads(arch, layer, dW_x, dW_h, dA_flat.sum(axis=0), db_rec))
    if arch.embed_size:
        grads["W_emb"] = np.zeros_like(params["W_emb"])
        np.add.at(grads["W_emb"], X.T.reshape(-1), d_out.reshape(T * B, -1))
    return {name: np.ascontiguousarray(grads[name]) for name in params}


def _through_time(cell: str, steps: list, d_out: np.ndarray, W_h: np.ndarray, activation: str,
                  reset_after: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """dA and dR (T, B, G*H) for one layer: the gradient of the loss w.r.t. each step's gate
    pre-activations on the input and the recurrent side (`cells.step_backward`), given d_out (T, B, H),
    the gradient w.r.t. the layer's outputs."""
    T = len(steps)
    dH_next = np.zeros_like(d_out[0])
    dC_next = np.zeros_like(d_out[0]) if cell == "lstm" else None
    dA, dR = [None] * T, [None] * T
    for t in reversed(range(T)):
        dA[t], dR[t], dH_next, dC_next = cells.step_backward(cell, steps[t], d_out[t] + dH_next, dC_next, W_h,
                                                             activation, reset_after)
    return np.stack(dA), np.stack(dR)


def dropout_masks(rng: np.random.Generator, p: float, num_layers: int, B: int, T: int, H: int,
                  dtype, locked: bool = False) -> np.ndarray | None:
    """(L, T, B, H) inverted-dropout masks: 0 with probability p, else 1 / (1 - p). None when p is 0.

    `locked` (variational dropout, Gal & Ghahramani 2016; AWD-LSTM's LockedDropout) draws one (B, H) mask per
    layer and repeats it at every time step: a unit dropped for a sequence stays dropped for all of it, so
    the noise cannot average out over the steps the way independent per-step masks do."""
    if p <= 0:
        return None
    keep = rng.random((num_layers, 1 if locked else T, B, H)) >= p
    return np.broadcast_to(keep / (1.0 - p), (num_layers, T, B, H)).astype(dtype)


def recurrent_weight_names(arch: cells.Arch) -> list[str]:
    """The hidden-to-hidden matrices W_h* of every gate and layer (not W_hq, the output layer)."""
    return [names[1] for layer in range(arch.num_layers) for names in cells.layer_names(arch.cell, layer)]


def weight_drop_masks(rng: np.random.Generator, p: float, arch: cells.Arch,
                      dtype) -> dict[str, np.ndarray] | None:
    """Weight drop (DropConnect on the recurrent weights, as in Merity et al.'s AWD-LSTM): one (H, H) mask
    per W_h* and minibatch, the same at every time step; 0 with probability p, else 1 / (1 - p).
    It regularises the recurrent connections, which per-step dropout would disrupt. None when p is 0."""
    if p <= 0:
        return None
    H = arch.num_hiddens
    return {name: ((rng.random((H, H)) >= p) / (1.0 - p)).astype(dtype)
            for name in recurrent_weight_names(arch)}
