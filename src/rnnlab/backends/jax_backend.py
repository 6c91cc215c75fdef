"""The jax backend: the same forward math as the reference, differentiated by `jax.value_and_grad`, compiled
by XLA, on the CPU or a GPU.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, G = gates per cell,
L = num_layers, S = state slices.

The step of each cell is `cells.step`, the same code the numpy and torch backends run, here on jax arrays
(`JaxOps`). Time is a `jax.lax.scan` over that step in every layer, never a Python loop: the compiled
program holds one copy of the step whatever T is, so compiling costs the same for 5 steps or 500, and
reverse-mode differentiation of the scan is backpropagation through time.

What is jitted, and why:
  * the training step, loss and gradients together (`_loss_and_grads`): one XLA program per (B, T), dtype
    and network; dropout and weight-drop masks are arguments, so a new mask costs no compile (None, no
    masks, is a separate trace). Weight drop multiplies the weights by their masks inside the traced loss,
    so the gradient w.r.t. each weight carries its mask by the chain rule;
  * the forward pass without gradients (`_logits`), for scoring and decoding.
The network, activation and input kind are static arguments of module-level functions, so every backend
of the same network shares the compiled programs. Clipping and the optimizers are the shared `optim` code,
run eagerly on the jax arrays the gradients come in (a few dozen small elementwise calls per step); the
backend applies their result with `update`.

float64: importing this module turns on `jax_enable_x64` (a process-wide setting), without which jax
silently computes in float32. Every array is created with an explicit dtype, the parameters' own, and token
ids are int32, so a float32 run stays float32 throughout. Matmuls run at full precision (no TF32 on GPUs),
like the torch backends.
"""
from __future__ import annotations

import re
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

from .. import cells, network
from ..errors import RnnlabError
from . import masked_params

_PHI = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class JaxOps:
    """The elementwise functions of `cells.step`, for jax arrays."""
    tanh = staticmethod(jnp.tanh)
    sigmoid = staticmethod(jax.nn.sigmoid)
    relu = staticmethod(jax.nn.relu)
    stack = staticmethod(jnp.stack)
    unbind = staticmethod(list)
    cat = staticmethod(lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, -1))
    one_hot = staticmethod(lambda X, vocab_size, like: jax.nn.one_hot(X, vocab_size, dtype=like.dtype))


def jax_device(name: str):
    """'cpu', 'cuda' or 'cuda:N' -> the jax device (cuda: jax's GPU N), or a one-line RnnlabError."""
    if name == "cpu":
        return jax.devices("cpu")[0]
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise RnnlabError(f"--device {name}: the jax backend runs on cpu, cuda or cuda:N")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        raise RnnlabError(f"--device {name}: JAX has no GPU on this machine (install jax[cuda12] for one)") \
            from None
    index = int(m[1] or 0)
    if index >= len(gpus):
        raise RnnlabError(f"--device {name}: JAX sees {len(gpus)} GPU(s), numbered from 0")
    return gpus[index]


def jax_has_gpu() -> bool:
    """Whether jax sees a GPU (the jax backend's `--device auto` picks it then)."""
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


# ---- the network, traced: module-level so that backends of one network share their compiled programs ----

def forward(params: dict, X, state, arch: cells.Arch, activation: str, onehot_input: bool, masks=None):
    """X (B, T) token ids, state (S, B, H) -> logits (T*B, V) time-major, new state (S, B, H)."""
    phi = _PHI[activation]
    inputs, finals = None, []
    for layer in range(arch.num_layers):                       # layers: a Python loop, unrolled once
        W_x, W_h, b, b_rec = cells.layer_weights(params, arch, layer, JaxOps)
        if layer > 0:
            XW = inputs @ W_x + b                              # (T, B, H) @ (H, G*H)
        elif arch.embed_size:
            XW = params["W_emb"][X.T] @ W_x + b                # (T, B, E) @ (E, G*H)
        elif onehot_input:                                     # the book's literal one-hot matmul
            XW = JaxOps.one_hot(X.T, W_x.shape[0], W_x) @ W_x + b
        else:
            XW = W_x[X.T] + b                                  # (T, B, G*H): gathered rows

        def step(layer_state, XW_t, W_h=W_h, b_rec=b_rec):    # XW_t (B, G*H); this layer's W_h, b_rec
            layer_state, _ = cells.step(arch.cell, XW_t, layer_state, W_h, JaxOps, phi, b_rec)
            return layer_state, layer_state[0]

        final, Hs = jax.lax.scan(step, network.split_state(state, arch, layer), XW)   # Hs (T, B, H)
        finals.append(final)
        inputs = Hs * masks[layer] if masks is not None else Hs
    logits = cells.output_layer(inputs, params["W_hq"], params["b_q"])
    return logits, network.join_state(finals, JaxOps)


def _mean_loss(params, X, y, state, masks, weight_masks, arch, activation, onehot_input):
    """(mean cross-entropy over the T*B predictions, new state); y (T*B,) time-major targets."""
    used = masked_params(params, weight_masks)                 # W * M: the gradient w.r.t. W carries M
    logits, new_state = forward(used, X, state, arch, activation, onehot_input, masks)
    log_p = jax.nn.log_softmax(logits)                         # (T*B, V)
    return -jnp.take_along_axis(log_p, y[:, None], axis=1).mean(), new_state


_STATIC = ("arch", "activation", "onehot_input")
_loss_and_grads = jax.jit(jax.value_and_grad(_mean_loss, has_aux=True), static_argnames=_STATIC)


@partial(jax.jit, static_argnames=_STATIC)
def _logits(params, X, state, arch, activation, onehot_input):
    return forward(params, X, state, arch, activation, onehot_input)


@jax.jit
def _token_nll(logits, y):
    """Per-row NLL (T*B,) in float64."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float64))
    return -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]


class JaxBackend:
    name = "jax"

    def __init__(self, params: dict[str, np.ndarray], activation: str = "tanh", device: str = "cpu",
                 onehot_input: bool = False):
        self._device = jax_device(device)
        on_gpu = self._device.platform != "cpu"
        self.device = f"cuda:{jax.devices('gpu').index(self._device)}" if on_gpu else "cpu"
        self.params = {k: self._put(v) for k, v in params.items()}
        self.arch = cells.describe(self.params)
        self.activation = activation
        self.onehot_input = onehot_input
        self._static = {"arch": self.arch, "activation": activation, "onehot_input": onehot_input}

    @property
    def dtype(self):
        return self.params["W_hq"].dtype

    def _put(self, array, dtype=None):
        """An array on this backend's device: jax arrays as they are, anything else copied (a caller may
        change its numpy array later) as numpy `dtype`."""
        if not isinstance(array, jax.Array):
            array = np.array(array, dtype=dtype)
        return jax.device_put(array, self._device)

    def _ids(self, X):
        """Token ids as int32 on the device (one trace whatever integer type the caller holds)."""
        return self._put(np.asarray(X), np.int32)

    def _float(self, x):
        """Masks or a state (numpy or jax) on the device, numpy ones in the model's dtype; None stays None."""
        return None if x is None else self._put(x, self.dtype)

    def begin_state(self, batch_size: int):
        """Zeros, (S, B, H)."""
        return self._put(np.zeros((self.arch.num_state_slices, batch_size, self.arch.num_hiddens), self.dtype))

    def loss_and_grads(self, X, Y, state, masks=None, weight_masks=None):
        """Mean loss, gradients (jax arrays, keyed like the parameters) and the final state."""
        y = self._ids(np.asarray(Y).T.reshape(-1))                             # (T*B,) time-major
        weight_masks = None if not weight_masks else {k: self._float(m) for k, m in weight_masks.items()}
        with jax.default_matmul_precision("highest"):
            (loss, new_state), grads = _loss_and_grads(self.params, self._ids(X), y, self._float(state),
                                                       self._float(masks), weight_masks, **self._static)
        return float(loss), grads, new_state

    def _forward(self, X, state):
        with jax.default_matmul_precision("highest"):
            return _logits(self.params, self._ids(X), self._float(state), **self._static)

    def token_nll(self, X, Y, state):
        """Per-prediction NLL (T*B,) as float64 numpy, time-major, and the final state; no gradients."""
        logits, new_state = self._forward(X, state)
        nll = _token_nll(logits, self._ids(np.asarray(Y).T.reshape(-1)))
        return np.array(nll), new_state

    def step(self, token_ids, state):
        """One decoding step: token_ids (B,) -> logits (B, V) as numpy, new state."""
        logits, new_state = self._forward(np.asarray(token_ids).reshape(-1, 1), state)
        return np.array(logits), new_state

    def decoder(self):
        """A `generate` step callback (the same interface as the numpy backend's)."""
        return self.step

    def update(self, fn) -> None:
        """Apply an update: the parameters become fn(parameters), arrays on this backend's device."""
        self.params = {k: self._put(v) for k, v in fn(self.params).items()}

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.params.items()}
