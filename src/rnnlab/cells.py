"""The cells, written once: parameters, the forward step of each cell, and the numpy backward step.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, I = a layer's input width,
E = embedding size, L = num_layers, S = state slices (L, or 2L for the LSTM's H and C).

The book's RNN (§8.5), with its parameter names:

    H_t = phi(X_t W_xh + H_{t-1} W_hh + b_h)     W_xh (V, H), W_hh (H, H), b_h (H,)
    O_t = H_t W_hq + b_q                         W_hq (H, V), b_q (V,)

X_t is a one-hot row, so X_t W_xh is row x_t of W_xh: gathering rows equals the book's one-hot matmul.

The GRU (§10.2) and LSTM (§10.1) keep the book's names, one (W_x*, W_h*, b_*) triple per gate:

    GRU   Z = sig(X W_xz + H W_hz + b_z)   R = sig(X W_xr + H W_hr + b_r)
          H~ = tanh(X W_xh + (R * H) W_hh + b_h)        H_t = Z * H + (1 - Z) * H~
    LSTM  I = sig(X W_xi + H W_hi + b_i)   F = sig(X W_xf + H W_hf + b_f)   O = sig(X W_xo + H W_ho + b_o)
          C~ = tanh(X W_xc + H W_hc + b_c)  C_t = F * C + I * C~           H_t = O * tanh(C_t)

Layer l > 1 of a stack takes the layer below's states as its X and names its parameters with the suffix
`_l<l>` (W_xh_l2, ...). With a learned embedding, tokens are looked up in W_emb (V, E) and layer 1's W_x*
are (E, H); without one, layer 1's W_x* are (V, H) and gathered by token (one-hot input).

The framework's recurrent layers (torch.nn.RNN / GRU / LSTM, cuDNN) compute the same cells in another form,
`cell_variant="nn"`: every gate carries two biases, b_* on the input side (torch's bias_ih) and b_h* on the
recurrent side (bias_hh), and the GRU applies its reset gate after the recurrent matmul:

    nn GRU   H~ = tanh(X W_xh + b_h + R * (H W_hh + b_hh))          (the book: (R * H) W_hh)

The LSTM and the RNN only gain the second bias. The variant follows from the names present, like the cell.

Inside a layer the gates' weights are concatenated in gate order (W_x (I, G*H), W_h (H, G*H), b (G*H,)) so
each step needs one recurrent matmul (two for the GRU, whose candidate sees R * H). The step functions use
only `@`, `*`, `+`, slicing and the functions of an `ops` namespace, so the same forward code runs on numpy
arrays (the reference) and torch tensors (differentiated by autograd).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

GATES = {"rnn": ("h",), "gru": ("z", "r", "h"), "lstm": ("i", "f", "o", "c")}
CELLS = tuple(GATES)
VARIANTS = ("book", "nn")          # nn: two biases per gate, the GRU's reset after its recurrent matmul
PARAM_NAMES = ("W_xh", "W_hh", "b_h", "W_hq", "b_q")       # the book's RNN


class NumpyOps:
    """The elementwise functions the forward step needs, for numpy arrays."""
    tanh = staticmethod(np.tanh)
    cat = staticmethod(lambda xs: xs[0] if len(xs) == 1 else np.concatenate(xs, -1))
    stack = staticmethod(np.stack)
    unbind = staticmethod(list)                         # (T, ...) -> T views, one per step

    @staticmethod
    def sigmoid(a):
        return 0.5 * (1.0 + np.tanh(0.5 * a))          # = 1 / (1 + e^-a), without overflow

    @staticmethod
    def relu(a):
        return np.maximum(a, 0)

    @staticmethod
    def one_hot(X, vocab_size, like):
        return one_hot(X, vocab_size, like.dtype)


@dataclass(frozen=True)
class Arch:
    """The shape of a network, as read from its parameters."""
    cell: str = "rnn"
    num_layers: int = 1
    embed_size: int = 0              # 0: one-hot input (gathered rows of layer 1's W_x*)
    vocab_size: int = 0
    num_hiddens: int = 0
    variant: str = "book"            # "nn": the framework's form (two biases, reset-after GRU)

    @property
    def num_state_slices(self) -> int:
        return 2 * self.num_layers if self.cell == "lstm" else self.num_layers

    @property
    def is_book_rnn(self) -> bool:
        """The §8.5 model: one RNN layer on one-hot input (the book RNN's own fused path runs it)."""
        return self.cell == "rnn" and self.num_layers == 1 and not self.embed_size and self.variant == "book"


def suffix(layer: int) -> str:
    """'' for the first layer (the book's names), '_l2', '_l3', ... above it; `layer` counts from 0."""
    return "" if layer == 0 else f"_l{layer + 1}"


def layer_names(cell: str, layer: int, variant: str = "book") -> list[tuple[str, ...]]:
    """(W_x*, W_h*, b_*) names of every gate of one layer, in gate order; (W_x*, W_h*, b_*, b_h*) for the
    nn variant."""
    s = suffix(layer)
    if variant == "nn":
        return [(f"W_x{g}{s}", f"W_h{g}{s}", f"b_{g}{s}", f"b_h{g}{s}") for g in GATES[cell]]
    return [(f"W_x{g}{s}", f"W_h{g}{s}", f"b_{g}{s}") for g in GATES[cell]]


def param_shapes(vocab_size: int, num_hiddens: int, cell: str = "rnn", num_layers: int = 1,
                 embed_size: int = 0, cell_variant: str = "book") -> dict[str, tuple[int, ...]]:
    """The shape of every parameter, by name, in the order they are initialised."""
    V, H = vocab_size, num_hiddens
    shapes = {"W_emb": (V, embed_size)} if embed_size else {}
    for layer in range(num_layers):
        num_inputs = H if layer else (embed_size or V)
        for names in layer_names(cell, layer, cell_variant):
            shapes.update({names[0]: (num_inputs, H), names[1]: (H, H)})
            shapes.update({b: (H,) for b in names[2:]})
    shapes.update({"W_hq": (H, V), "b_q": (V,)})
    return shapes


def init_params(vocab_size: int, num_hiddens: int, rng: np.random.Generator, dtype=np.float32,
                cell: str = "rnn", num_layers: int = 1, embed_size: int = 0,
                init: str = "normal", cell_variant: str = "book") -> dict[str, np.ndarray]:
    """The book's `get_params`: weights ~ N(0, 0.01^2), biases zero, weights drawn in the book's order.

    `init="uniform"` draws weights from U(-1/sqrt(H), 1/sqrt(H)) instead (torch.nn.RNN/GRU/LSTM's scheme),
    which deep and gated models train better from; `init="flax"` is the chapter's JAX port's Flax cells:
    lecun-normal W_x* and W_hq, orthogonal W_h* (W_emb: lecun-normal over its E columns). Drawn in float64
    and then cast, so every dtype and every backend starts from the same weights.
    """
    bound = 1.0 / np.sqrt(num_hiddens)

    def draw(name, shape):
        if init == "normal":
            return rng.standard_normal(shape) * 0.01
        if init == "uniform":
            return rng.uniform(-bound, bound, shape)
        if name.startswith("W_h") and name != "W_hq":
            return orthogonal(rng, shape[0])
        return lecun_normal(rng, shape, fan_in=shape[1] if name == "W_emb" else shape[0])

    shapes = param_shapes(vocab_size, num_hiddens, cell, num_layers, embed_size, cell_variant)
    return {name: draw(name, shape).astype(dtype) if name.startswith("W") else np.zeros(shape, dtype=dtype)
            for name, shape in shapes.items()}


def lecun_normal(rng: np.random.Generator, shape: tuple, fan_in: int) -> np.ndarray:
    """Flax's default kernel init: a normal truncated to [-2, 2] standard deviations, scaled so the
    variance is 1 / fan_in (0.8796 is the standard deviation of a unit normal truncated there)."""
    z = rng.standard_normal(shape)
    out_of_range = np.abs(z) > 2
    while out_of_range.any():                       # redraw the tails: a truncated normal
        z[out_of_range] = rng.standard_normal(int(out_of_range.sum()))
        out_of_range = np.abs(z) > 2
    return z * (np.sqrt(1.0 / fan_in) / 0.87962566103423978)


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random (n, n) orthogonal matrix (Flax's recurrent init): Q of the QR of a normal matrix, its
    columns' signs fixed by R's diagonal so that Q is uniformly distributed."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


_KIND_RANK = {"W_x": 0, "W_h": 1, "b_": 2, "b_h": 3}
_GATE_RANK = {g: i for gates in GATES.values() for i, g in enumerate(gates)}   # i f o c / z r h / h
_LAYER_NAME = re.compile(r"(W_x|W_h|b_h|b_)([a-z])(?:_l(\d+))?")      # b_hz: b_h + z; b_h: b_ + h


def canonical_key(name: str) -> tuple:
    """Sort key putting parameter names in `param_shapes` order (W_emb, then every layer's gates as
    W_x*, W_h*, b_* [, b_h*], then W_hq, b_q), whatever order a dict holds them in. Reductions over parameters
    (the global gradient norm) follow it, so they give the same bits in every process."""
    if name == "W_emb":
        return (0,)
    if name in ("W_hq", "b_q"):
        return (2, name)
    m = _LAYER_NAME.fullmatch(name)
    if m is None:
        return (3, name)                       # not a model parameter: after all of them, by name
    return (1, int(m[3] or 1), _GATE_RANK.get(m[2], len(GATES)), _KIND_RANK[m[1]], name)


def canonical_order(names) -> list[str]:
    """`names` sorted by `canonical_key`."""
    return sorted(names, key=canonical_key)


def describe(params: dict) -> Arch:
    """The Arch of a parameter dict (cell, depth, input kind and variant follow from the names present)."""
    cell = "lstm" if "W_xi" in params else "gru" if "W_xz" in params else "rnn"
    variant = "nn" if f"b_h{GATES[cell][0]}" in params else "book"
    num_layers = 1
    while f"W_xh{suffix(num_layers)}" in params or f"W_xi{suffix(num_layers)}" in params:
        num_layers += 1
    embed_size = params["W_emb"].shape[1] if "W_emb" in params else 0
    V, H = params["W_hq"].shape[1], params["W_hq"].shape[0]
    return Arch(cell, num_layers, embed_size, V, H, variant)


def layer_weights(params: dict, arch: Arch, layer: int, ops) -> tuple:
    """One layer's gates concatenated: W_x (I, G*H), W_h (H, G*H), b (G*H,), and the recurrent-side
    bias b_rec (G*H,) of the nn variant (None for the book's cells)."""
    names = layer_names(arch.cell, layer, arch.variant)
    W_x, W_h, b = (ops.cat([params[n[k]] for n in names]) for k in range(3))
    b_rec = ops.cat([params[n[3]] for n in names]) if arch.variant == "nn" else None
    return W_x, W_h, b, b_rec


def split_layer_grads(arch: Arch, layer: int, dW_x, dW_h, db, db_rec=None) -> dict:
    """Concatenated gradients of one layer back to the per-gate names."""
    H = dW_h.shape[0]
    out = {}
    for g, names in enumerate(layer_names(arch.cell, layer, arch.variant)):
        cols = slice(g * H, (g + 1) * H)
        out.update({names[0]: dW_x[:, cols], names[1]: dW_h[:, cols], names[2]: db[cols]})
        if db_rec is not None:
            out[names[3]] = db_rec[cols]
    return out


# ---- input and output layers ----

def one_hot(X: np.ndarray, vocab_size: int, dtype=np.float32) -> np.ndarray:
    """(...,) indices -> (..., V) one-hot rows: the book's input encoding."""
    return np.eye(vocab_size, dtype=dtype)[X]


def output_layer(Hs, W_hq, b_q):
    """(T, B, H) states -> (T*B, V) logits, rows in the book's time-major order."""
    return Hs.reshape(-1, Hs.shape[-1]) @ W_hq + b_q


# ---- one step of each cell, forward; shared by numpy and torch ----

def step(cell: str, XW_t, state: tuple, W_h, ops, phi, b_rec=None, rec=None):
    """One time step. XW_t (B, G*H) is the input projection with its biases, `state` is (H,) or (H, C) for
    the LSTM, b_rec (G*H,) the nn variant's recurrent-side bias (None: the book's cells). `rec`, for the RNN
    and the LSTM only, is H @ W_h when the caller has computed it already (a decoding loop that multiplies
    H by W_h and the next weights in one matmul). Returns (new state tuple, cache): the cache holds what the
    numpy backward step needs."""
    H = state[0]
    if rec is not None and cell == "gru":
        raise ValueError("the GRU computes its recurrent products itself")
    Hn = H.shape[-1]
    if cell == "gru" and b_rec is not None:          # nn.GRU: reset gate after the recurrent matmul
        HW = H @ W_h + b_rec                                             # (B, 3H)
        ZR = ops.sigmoid(XW_t[:, :2 * Hn] + HW[:, :2 * Hn])
        Z, R = ZR[:, :Hn], ZR[:, Hn:]
        HW_h = HW[:, 2 * Hn:]
        H_tilde = ops.tanh(XW_t[:, 2 * Hn:] + R * HW_h)
        H_new = Z * H + (1 - Z) * H_tilde
        return (H_new,), (H, Z, R, HW_h, H_tilde)
    if b_rec is not None:                            # the RNN and the LSTM: a second bias, nothing else
        XW_t = XW_t + b_rec
    if rec is None and cell != "gru":
        rec = H @ W_h
    if cell == "rnn":
        H_new = phi(XW_t + rec)
        return (H_new,), (H, H_new)
    if cell == "gru":
        ZR = ops.sigmoid(XW_t[:, :2 * Hn] + H @ W_h[:, :2 * Hn])
        Z, R = ZR[:, :Hn], ZR[:, Hn:]
        RH = R * H
        H_tilde = ops.tanh(XW_t[:, 2 * Hn:] + RH @ W_h[:, 2 * Hn:])
        H_new = Z * H + (1 - Z) * H_tilde
        return (H_new,), (H, Z, R, RH, H_tilde)
    C = state[1]
    A = XW_t + rec
    IFO = ops.sigmoid(A[:, :3 * Hn])
    I, F, O = IFO[:, :Hn], IFO[:, Hn:2 * Hn], IFO[:, 2 * Hn:]
    C_tilde = ops.tanh(A[:, 3 * Hn:])
    C_new = F * C + I * C_tilde
    tanh_C = ops.tanh(C_new)
    H_new = O * tanh_C
    return (H_new, C_new), (H, C, I, F, O, C_tilde, tanh_C)


# ---- numpy only below: the loss and the hand-written backward step of the reference backend ----

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


def step_backward(cell: str, cache: tuple, dH: np.ndarray, dC: np.ndarray | None, W_h: np.ndarray,
                  activation: str, reset_after: bool = False):
    """Back through one step. dH (B, H) [and dC] are the gradients w.r.t. the step's new state.

    Returns dA (B, G*H), the gradient w.r.t. the gates' pre-activations on the input side (from which the
    caller forms W_x*'s and b_*'s gradients), dR (B, G*H), the same on the recurrent side (what multiplies
    W_h* and b_h*: it differs from dA only in the reset-after GRU's candidate, where R scales it), and the
    gradients w.r.t. the previous state (dH_prev, dC_prev or None).
    """
    Hn = dH.shape[-1]
    if cell == "gru" and reset_after:
        H, Z, R, HW_h, H_tilde = cache
        dA_h = dH * (1 - Z) * (1 - H_tilde * H_tilde)
        dR_h = dA_h * R                                                  # d/d(H W_hh + b_hh)
        dA_zr = np.concatenate([dH * (H - H_tilde) * Z * (1 - Z), dA_h * HW_h * R * (1 - R)], -1)
        dR = np.concatenate([dA_zr, dR_h], -1)
        return np.concatenate([dA_zr, dA_h], -1), dR, dH * Z + dR @ W_h.T, None
    if cell == "rnn":
        _, H_new = cache
        dA = dH * activation_grad(activation, H_new)
        return dA, dA, dA @ W_h.T, None
    if cell == "gru":
        H, Z, R, RH, H_tilde = cache
        dA_h = dH * (1 - Z) * (1 - H_tilde * H_tilde)
        dRH = dA_h @ W_h[:, 2 * Hn:].T
        dA_z = dH * (H - H_tilde) * Z * (1 - Z)
        dA_r = dRH * H * R * (1 - R)
        dA_zr = np.concatenate([dA_z, dA_r], -1)
        dH_prev = dH * Z + dRH * R + dA_zr @ W_h[:, :2 * Hn].T
        dA = np.concatenate([dA_zr, dA_h], -1)
        return dA, dA, dH_prev, None
    H, C, I, F, O, C_tilde, tanh_C = cache
    dC = dC + dH * O * (1 - tanh_C * tanh_C)
    dA = np.concatenate([dC * C_tilde * I * (1 - I), dC * C * F * (1 - F), dH * tanh_C * O * (1 - O),
                         dC * I * (1 - C_tilde * C_tilde)], -1)
    return dA, dA, dA @ W_h.T, dC * F


def recurrent_inputs(cell: str, caches: list, reset_after: bool = False) -> list[tuple[np.ndarray, slice]]:
    """What multiplies W_h in each step, for the weight gradient: (T, B, H) stacks with the W_h columns
    they feed. All gates see H_{t-1}, except the book GRU's candidate, which sees R * H_{t-1}."""
    H_prev = np.stack([c[0] for c in caches])
    if cell != "gru" or reset_after:
        return [(H_prev, slice(None))]
    Hn = H_prev.shape[-1]
    return [(H_prev, slice(0, 2 * Hn)), (np.stack([c[3] for c in caches]), slice(2 * Hn, None))]
