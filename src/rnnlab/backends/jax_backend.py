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
  * the forward pass without gradients (`_logits`), for scoring and decoding;
  * one greedy continuation, the prompt's steps and every token's, as one `lax.fori_loop` (`_greedy`), so
    that decoding greedily runs no Python per token.
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
        else:
            XW = _first_projection(params, X.T, W_x, b, arch, onehot_input)

        def step(layer_state, XW_t, W_h=W_h, b_rec=b_rec):    # XW_t (B, G*H); this layer's W_h, b_rec
            layer_state, _ = cells.step(arch.cell, XW_t, layer_state, W_h, JaxOps, phi, b_rec)
            return layer_state, layer_state[0]

        final, Hs = jax.lax.scan(step, network.split_state(state, arch, layer), XW)   # Hs (T, B, H)
        finals.append(final)
        inputs = Hs * masks[layer] if masks is not None else Hs
    logits = cells.output_layer(inputs, params["W_hq"], params["b_q"])
    return logits, network.join_state(finals, JaxOps)


def _first_projection(params: dict, X, W_x, b, arch: cells.Arch, onehot_input: bool):
    """The first layer's input projection with its bias: X (...) token ids -> (..., G*H)."""
    if arch.embed_size:
        return params["W_emb"][X] @ W_x + b                    # (..., E) @ (E, G*H)
    if onehot_input:                                           # the book's literal one-hot matmul
        return JaxOps.one_hot(X, W_x.shape[0], W_x) @ W_x + b
    return W_x[X] + b                                          # gathered rows


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


# ---- one greedy continuation, in one compiled loop ----

def _decoding_weights(params, arch) -> dict:
    """What the decoding loop multiplies by, made once per parameters: each layer's gates concatenated
    (`cells.layer_weights`), and per layer [W_h | W_next] where the layer's next weights (the next layer's
    W_x, or W_hq on top) are narrow, as the numpy decoder measures it (a quarter of W_h's width at most: the
    output layer of a character model), else None; never for the GRU, which computes its recurrent
    products itself."""
    layers = tuple(cells.layer_weights(params, arch, layer, JaxOps) for layer in range(arch.num_layers))
    nexts = [W_x for W_x, _, _, _ in layers[1:]] + [params["W_hq"]]
    fused = tuple(jnp.concatenate([W_h, W_next], 1) if arch.cell != "gru" and 4 * W_next.shape[1] <= W_h.shape[1]
                  else None for (_, W_h, _, _), W_next in zip(layers, nexts))
    return {"layers": layers, "fused": fused, "W_emb": params.get("W_emb"), "W_hq": params["W_hq"],
            "b_q": params["b_q"]}


_decoding_weights_jit = jax.jit(_decoding_weights, static_argnames=("arch",))


def _recurrent(weights, state, arch):
    """The recurrent products H @ W_h (1, G*H) of the layers `_greedy` multiplies fused (None for the
    others), for a state the loop did not make."""
    return tuple(None if f is None else network.split_state(state, arch, k)[0] @ weights["layers"][k][1]
                 for k, f in enumerate(weights["fused"]))


_recurrent_jit = jax.jit(_recurrent, static_argnames=("arch",))


def _greedy(weights, feed, feed_len, state, recs, num_preds, never, arch, activation, onehot_input, out_len):
    """`Decoder.greedy` traced: `feed_len` steps on feed[:feed_len] (a prompt, or the token chosen last), the
    outputs of the first feed_len - 1 discarded, then `num_preds` steps, each on the argmax of the last
    logits with the `never` tokens (V,) bool left out. Returns ids (out_len,), logits (out_len, V) (the
    first num_preds rows are the continuation's), the state (S, 1, H) and its recurrent products `recs`.

    Each step is `forward`'s for one token: `_first_projection`, `cells.step` and the output layer, on
    `weights` (`_decoding_weights`). Where a layer has [W_h | W_next], its new H is multiplied by both in
    one matmul, as the numpy decoder does: the first columns are the next step's recurrent product, passed
    to `cells.step` as `rec` and carried from one call to the next (`recs`: `_recurrent` for a state the
    loop did not make), the others what the layer feeds. XLA may round that product differently from the
    step's own H @ W_h (it picks its kernels by shape), so the loop's logits are the step's to rounding."""
    phi, L = _PHI[activation], arch.num_layers
    fused = weights["fused"]
    nexts = [W_x for W_x, _, _, _ in weights["layers"][1:]] + [weights["W_hq"]]     # what each layer feeds
    layers = tuple(network.split_state(state, arch, layer) for layer in range(L))

    def advance(tok, layers, recs):
        """One step on token `tok`: the logits (V,) and the new layers' states and recurrent products."""
        y, new_layers, new_recs = None, [], []
        for layer, (W_x, W_h, b, b_rec) in enumerate(weights["layers"]):
            XW = _first_projection(weights, tok[None], W_x, b, arch, onehot_input) if layer == 0 else y + b
            new, _ = cells.step(arch.cell, XW, layers[layer], W_h, JaxOps, phi, b_rec, recs[layer])
            if fused[layer] is None:
                rec, y = None, new[0] @ nexts[layer]
            else:                                                  # (1, G*H + next width)
                both = new[0] @ fused[layer]
                rec, y = both[:, :W_h.shape[1]], both[:, W_h.shape[1]:]
            new_layers.append(new)
            new_recs.append(rec)
        return (y + weights["b_q"])[0], tuple(new_layers), tuple(new_recs)

    def warm_up(i, carry):                                         # the feed's tokens but the last
        return advance(feed[i], *carry)[1:]

    def choose(i, carry):
        tok, layers, recs, ids, logits = carry
        z, layers, recs = advance(tok, layers, recs)
        tok = jnp.argmax(jnp.where(never, -jnp.inf, z)).astype(jnp.int32)
        return (tok, layers, recs, jax.lax.dynamic_update_index_in_dim(ids, tok, i, 0),
                jax.lax.dynamic_update_index_in_dim(logits, z, i, 0))

    layers, recs = jax.lax.fori_loop(0, feed_len - 1, warm_up, (layers, recs))
    start = (feed[feed_len - 1], layers, recs, jnp.zeros(out_len, jnp.int32),
             jnp.zeros((out_len, weights["b_q"].shape[0]), weights["b_q"].dtype))
    _, layers, recs, ids, logits = jax.lax.fori_loop(0, num_preds, choose, start)
    return ids, logits, network.join_state(list(layers), JaxOps), recs


_greedy_jit = jax.jit(_greedy, static_argnames=_STATIC + ("out_len",))


def _bucket(n: int, least: int) -> int:
    """The buffer length for n items: a power of two, at least `least`, so that few lengths compile."""
    return max(least, 1 << max(n - 1, 0).bit_length())


class Decoder:
    """The jax backend's decoding step for the parameters it was made with, `step(token_ids (B,), state) ->
    (logits (B, V), state)`, with `greedy`: one continuation decoded in one compiled loop (`_greedy`), with
    no Python per token. The loop carries each layer's recurrent product from one call to the next for the
    state it returned last, so a continuation gets the same tokens however it is cut into calls. Its logits
    are its step's to float rounding (XLA picks its kernels by shape); on the tested shapes its tokens are
    the step's. Buffers are sized in powers of two, so that a few compiled programs (a fraction of a second
    each) serve every length."""

    def __init__(self, backend: "JaxBackend"):
        self._backend, self._params = backend, backend.params
        self._last = None              # (the state `greedy` returned last, its recurrent products)

    def __call__(self, token_ids, state):
        return self._backend.step(token_ids, state, self._params)

    def greedy(self, feed, state, num_preds: int, never=()):
        """Feed the tokens `feed`, then choose `num_preds` tokens, each the argmax of its logits with the
        `never` tokens left out, each fed back but the last. Returns the tokens (n,) int64, their logits
        (n, V) and the state, as `decoding.greedy_steps` does over this decoder's steps (the logits to
        rounding). A jax state of another dtype than the weights goes through `greedy_steps` itself, which
        promotes as the step does."""
        b = self._backend
        feed = np.asarray(feed, dtype=np.int64).reshape(-1)
        if not len(feed):
            raise ValueError("greedy decoding feeds at least one token")
        if isinstance(state, jax.Array) and state.dtype != b.dtype:    # as the step computes it: promoted
            from ..decoding import greedy_steps
            return greedy_steps(self, feed, state, num_preds, never)
        padded = np.zeros(_bucket(len(feed), 16), np.int32)
        padded[:len(feed)] = feed
        weights, begin = b.decoding_weights(self._params)       # made on the first greedy call of the params
        mask = np.zeros(weights["b_q"].shape[0], bool)
        mask[list(never)] = True
        if not isinstance(state, jax.Array):
            state = b._float(state)
        with jax.default_matmul_precision("highest"):
            if self._last is not None and state is self._last[0]:
                recs = self._last[1]
            elif state is begin[0]:
                recs = begin[1]
            else:
                recs = _recurrent_jit(weights, state, arch=b.arch)
            # numpy arguments go to the device of the weights, committed there, with the call
            ids, logits, state, recs = _greedy_jit(weights, padded, np.int32(len(feed)), state, recs,
                                                   np.int32(num_preds), mask, out_len=_bucket(num_preds, 32),
                                                   **b._static)
        self._last = (state, recs)
        ids, logits = jax.device_get((ids, logits))
        return ids[:num_preds].astype(np.int64), logits[:num_preds], state


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
        self._decoding = None                  # (params, decoding weights, begin state and products): on demand
        self._zeros: dict = {}                                 # (batch size, dtype) -> begin_state's zeros

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
        """Zeros, (S, B, H): one array per batch size, made once (jax arrays cannot be changed)."""
        key = (batch_size, self.dtype)
        if key not in self._zeros:
            self._zeros[key] = self._put(np.zeros((self.arch.num_state_slices, batch_size, self.arch.num_hiddens),
                                                  self.dtype))
        return self._zeros[key]

    def loss_and_grads(self, X, Y, state, masks=None, weight_masks=None):
        """Mean loss, gradients (jax arrays, keyed like the parameters) and the final state."""
        y = self._ids(np.asarray(Y).T.reshape(-1))                             # (T*B,) time-major
        weight_masks = None if not weight_masks else {k: self._float(m) for k, m in weight_masks.items()}
        with jax.default_matmul_precision("highest"):
            (loss, new_state), grads = _loss_and_grads(self.params, self._ids(X), y, self._float(state),
                                                       self._float(masks), weight_masks, **self._static)
        return float(loss), grads, new_state

    def _forward(self, X, state, params=None):
        with jax.default_matmul_precision("highest"):
            return _logits(self.params if params is None else params, self._ids(X), self._float(state),
                           **self._static)

    def token_nll(self, X, Y, state):
        """Per-prediction NLL (T*B,) as float64 numpy, time-major, and the final state; no gradients."""
        logits, new_state = self._forward(X, state)
        nll = _token_nll(logits, self._ids(np.asarray(Y).T.reshape(-1)))
        return np.array(nll), new_state

    def step(self, token_ids, state, params=None):
        """One decoding step: token_ids (B,) -> logits (B, V) as numpy, new state; with the backend's
        parameters, or `params`."""
        logits, new_state = self._forward(np.asarray(token_ids).reshape(-1, 1), state, params)
        return np.array(logits), new_state

    def decoder(self):
        """A `generate` step callback for the current parameters (the same interface as the numpy backend's),
        with a compiled greedy loop (`Decoder`)."""
        return Decoder(self)

    def decoding_weights(self, params: dict) -> tuple[dict, tuple]:
        """The greedy loop's weights (`_decoding_weights`) for `params` (this backend's, now or before an
        update), and (begin_state(1), its recurrent products `_recurrent`), made once per parameters."""
        if self._decoding is None or self._decoding[0] is not params:
            with jax.default_matmul_precision("highest"):
                weights = _decoding_weights_jit(params, arch=self.arch)
                begin = self.begin_state(1)
                self._decoding = (params, weights, (begin, _recurrent_jit(weights, begin, arch=self.arch)))
        return self._decoding[1:]

    def update(self, fn) -> None:
        """Apply an update: the parameters become fn(parameters), arrays on this backend's device. The
        decoding weights made for the old ones are dropped, so they keep no copy alive."""
        self.params = {k: self._put(v) for k, v in fn(self.params).items()}
        self._decoding = None

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.params.items()}
