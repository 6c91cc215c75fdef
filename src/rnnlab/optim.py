"""Clipping, optimizers and learning-rate schedules, written once for every backend.

They use only elementwise arithmetic and `.sum()`, which numpy arrays and torch tensors share, so the
reference and the fast backends run literally the same update code. Clipping and updates return new arrays
(nothing is changed in place, so immutable JAX arrays work too), which the backend applies. Optimizer
buffers are arrays of the parameters' own kind; `state_dict` turns them into numpy arrays for the checkpoint.
"""
from __future__ import annotations

import math

import numpy as np

from . import cells

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
CLIP_MODES = ("norm", "value")


def grad_norm(grads: dict) -> float:
    """Global L2 norm over all gradients, as the book's `grad_clipping` computes it.

    The per-parameter sums are added in the canonical parameter order, not the dict's: a dict rebuilt from
    a checkpoint may list the parameters in another order, and float addition is not associative, so this
    is what makes a resumed run clip exactly as the uninterrupted one."""
    return float(sum((grads[k] * grads[k]).sum() for k in cells.canonical_order(grads))) ** 0.5


def clip_grad_norm(grads: dict, theta: float) -> tuple[dict, float, bool]:
    """Scale all gradients by theta / norm when the norm exceeds theta (theta = 0: never).

    Returns the (new) gradients, the norm before clipping and whether it clipped.
    """
    norm = grad_norm(grads)
    if theta > 0 and norm > theta:
        scale = theta / norm
        return {name: g * scale for name, g in grads.items()}, norm, True
    return grads, norm, False


def clip_grad_value(grads: dict, theta: float) -> tuple[dict, float, bool]:
    """Clip every gradient element to [-theta, theta] (theta = 0: never). Returns the (new) gradients, the
    norm before clipping and whether any element was clipped."""
    norm = grad_norm(grads)
    if theta <= 0:
        return grads, norm, False
    clipped = any(bool((abs(g) > theta).any()) for g in grads.values())
    return {name: g.clip(-theta, theta) for name, g in grads.items()}, norm, clipped


def clip(grads: dict, theta: float, mode: str = "norm") -> tuple[dict, float, bool]:
    """Clip by global norm (the book) or per element: (new gradients, norm before clipping, clipped?).
    No array is changed in place, so it serves immutable (JAX) arrays too."""
    return clip_grad_value(grads, theta) if mode == "value" else clip_grad_norm(grads, theta)


def all_finite(arrays) -> bool:
    """Whether every element of every array (numpy or torch) of a dict or a list is finite: x * 0 is 0
    for a finite x and nan for inf or nan, with the same arithmetic on both kinds of array."""
    values = arrays.values() if isinstance(arrays, dict) else arrays
    return all(bool((a * 0 == 0).all()) for a in values)


def sgd(params: dict, grads: dict, lr: float) -> dict:
    """The book's `sgd` with batch_size=1 (the loss is already a mean): the new parameters param - lr * grad."""
    return {name: p - lr * grads[name] for name, p in params.items()}


def _zeros_like(p):
    if hasattr(p, "new_zeros"):
        return p.new_zeros(p.shape)
    if type(p).__module__.startswith("jax"):                 # a jax array: zeros on its device
        import jax.numpy as jnp
        return jnp.zeros(p.shape, p.dtype, device=p.device)
    return np.zeros_like(p)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy().copy() if hasattr(x, "detach") else np.array(x, copy=True)


def copy(p):
    """A copy of an array or tensor, of the same kind."""
    return p.clone() if hasattr(p, "clone") else p.copy()


def like(array: np.ndarray, p):
    """A numpy array as a buffer of the same kind, dtype and device as parameter `p`."""
    if hasattr(p, "new_tensor"):
        return p.new_tensor(array)
    if type(p).__module__.startswith("jax"):
        import jax
        return jax.device_put(np.array(array, dtype=p.dtype), p.device)
    return np.asarray(array, dtype=p.dtype).copy()


def decays(name: str) -> bool:
    """Weight decay applies to weight matrices (W_*), not to biases."""
    return name.startswith("W")


class Optimizer:
    """An update rule: `step(params, grads, lr)` returns the new parameters, computed from the parameters,
    the gradients and the optimizer's state (its step count and buffers), which it replaces with the new
    state. No array is changed in place, so the same code serves numpy, torch and immutable arrays, and a
    backend applies the result (`backend.update`). `weight_decay` adds wd * W to the gradient of every
    weight matrix (L2), except in AdamW, which shrinks the weights directly (decoupled). With `ema` = d > 0
    it also keeps an exponential moving average of the weights after each update, E = d E + (1 - d) W, the
    weights a run evaluates and a model is loaded with (`averaged`): it smooths out the noise of the last
    updates, as SWA and Polyak averaging do, which matters most when the learning rate stays high."""
    name = "sgd"
    buffers: tuple[str, ...] = ()

    def __init__(self, weight_decay: float = 0.0, momentum: float = 0.9, betas=(0.9, 0.999), eps=1e-8,
                 ema: float = 0.0):
        self.weight_decay, self.momentum, self.betas, self.eps, self.ema = weight_decay, momentum, betas, eps, ema
        self.buffers = type(self).buffers + (("ema",) if ema else ())    # this run's: with the average
        self.t = 0                                   # updates taken
        self.state: dict[str, dict] = {b: {} for b in self.buffers}

    def step(self, params: dict, grads: dict, lr: float) -> dict:
        self.t += 1
        new = {}
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay and decays(name) and self.name != "adamw":
                g = g + self.weight_decay * p
            new[name] = self.update(name, p, g, lr)
            if self.ema:
                self.state["ema"][name] = self._buffer("ema", name, p) * self.ema + (1 - self.ema) * new[name]
        return new

    def averaged(self, params: dict) -> dict:
        """The exponential moving average of the weights after every update so far, with Adam's bias
        correction (the buffer starts at zero): sum_s (1 - d) d^(t-s) W_s / (1 - d^t). Before the first
        update, or without --ema, the weights themselves."""
        if not (self.ema and self.t):
            return params
        correction = 1.0 / (1.0 - self.ema ** self.t)
        return {name: self.state["ema"][name] * correction for name in params}

    def update(self, name, p, g, lr):
        return p - lr * g

    def buffer_arrays(self) -> list:
        """Every buffer array (momentum, Adam moments, the weight average), in no particular order."""
        return [v for bufs in self.state.values() for v in bufs.values()]

    def _buffer(self, kind: str, name: str, p):
        buf = self.state[kind].get(name)
        if buf is None:
            buf = self.state[kind][name] = _zeros_like(p)
        return buf

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-ready metadata, numpy arrays named '<buffer>.<param>') for a checkpoint."""
        arrays = {f"{kind}.{name}": _to_numpy(v) for kind, bufs in self.state.items() for name, v in bufs.items()}
        return {"name": self.name, "t": self.t, **({"ema": self.ema} if self.ema else {})}, arrays

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray], params: dict) -> None:
        """Restore `state_dict` output, strictly (ValueError otherwise): this optimizer's name, t >= 0, and
        once t > 0 every buffer of every parameter (none before), finite, of the parameter's shape and dtype."""
        name, t = (meta.get("name"), meta.get("t")) if isinstance(meta, dict) else (None, None)
        if name != self.name:
            raise ValueError(f"the optimizer state is for {name!r}, not {self.name!r}")
        if meta.get("ema", 0.0) != self.ema:
            raise ValueError(f"the optimizer state averages the weights with ema {meta.get('ema', 0.0)!r}, "
                             f"not {self.ema!r}")
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"the optimizer's step count t must be an integer >= 0, got {t!r}")
        expected = {f"{kind}.{p}": params[p] for kind in self.buffers for p in params} if t else {}
        missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        if missing or unexpected:
            raise ValueError(f"optimizer buffers do not fit the parameters after {t} steps (missing: "
                             f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(unexpected[:4]) or 'none'})")
        for key, p in expected.items():
            a = np.asarray(arrays[key])
            if a.shape != tuple(p.shape) or a.dtype.name != str(p.dtype).removeprefix("torch."):
                raise ValueError(f"optimizer buffer {key} is {a.dtype}{list(a.shape)}, its parameter "
                                 f"{str(p.dtype).removeprefix('torch.')}{list(p.shape)}")
            if not np.isfinite(a).all():
                raise ValueError(f"optimizer buffer {key} holds NaN or infinite values")
        self.t, self.state = t, {kind: {} for kind in self.buffers}
        for key, p in expected.items():
            kind, name = key.split(".", 1)
            self.state[kind][name] = like(arrays[key], p)


class Momentum(Optimizer):
    """SGD with heavy-ball momentum: v = mu v + g; W -= lr v."""
    name = "momentum"
    buffers = ("velocity",)

    def update(self, name, p, g, lr):
        v = self.state["velocity"][name] = self._buffer("velocity", name, p) * self.momentum + g
        return p - lr * v


class Adam(Optimizer):
    """Adam (Kingma & Ba): bias-corrected running means of g and g^2."""
    name = "adam"
    buffers = ("m", "v")

    def update(self, name, p, g, lr):
        b1, b2 = self.betas
        m = self.state["m"][name] = self._buffer("m", name, p) * b1 + (1 - b1) * g
        v = self.state["v"][name] = self._buffer("v", name, p) * b2 + (1 - b2) * (g * g)
        step = lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        return p - step * m / ((v ** 0.5) + self.eps * math.sqrt(1 - b2 ** self.t))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): W -= lr * wd * W, then the Adam step."""
    name = "adamw"

    def update(self, name, p, g, lr):
        if self.weight_decay and decays(name):
            p = p - (lr * self.weight_decay) * p
        return super().update(name, p, g, lr)


def make_optimizer(name: str, weight_decay: float = 0.0, momentum: float = 0.9, ema: float = 0.0) -> Optimizer:
    classes = {"sgd": Optimizer, "momentum": Momentum, "adam": Adam, "adamw": AdamW}
    return classes[name](weight_decay=weight_decay, momentum=momentum, ema=ema)


def lr_at(lr: float, epoch: float, num_epochs: int, schedule: str = "constant", warmup_epochs: float = 0.0,
          step_size: int = 1, gamma: float = 0.1, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of the update that completes `epoch` (fractional) epochs of training: a linear
    warm-up over `warmup_epochs`, then constant, step decay (x gamma every step_size epochs) or cosine
    decay to min_lr_ratio * lr at num_epochs."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if schedule == "step":
        return lr * gamma ** int((epoch - warmup_epochs) // step_size)
    if schedule == "cosine":
        span = max(num_epochs - warmup_epochs, 1e-12)
        progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr
