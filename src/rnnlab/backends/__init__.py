"""Backends: the same model on different array libraries.

`numpy` is the reference and the teaching code (hand-written BPTT, no autograd); `torch` differentiates the
same forward math with autograd, on CPU or CUDA. Both take the parameters as a dict of numpy arrays (so they
start from identical weights) and expose the same small interface:

    begin_state(batch_size) -> state (S, B, H), zeros; S = layers (x2 for the LSTM's cell states)
    loss_and_grads(X, Y, state, masks=None) -> (mean loss, grads dict, new state)   # state detached;
                                               # masks: (L, T, B, H) dropout masks or None
    token_nll(X, Y, state) -> (per-prediction NLL (T*B,) float64 numpy, new state)   # no gradients
    step(token_ids, state) -> (logits as numpy (B, V), new state)       # one decoding step
    decoder() -> a `step` callback, possibly precomputed for the current weights
    numpy_params() -> dict of numpy arrays

The network (cell, depth, input) is read from the parameter names (`cells.describe`). Gradients are
arrays of the backend's own kind, updated in place by the backend-neutral `optim` code.
"""
from __future__ import annotations

import importlib.util

from ..errors import RnnlabError

BACKENDS = ("numpy", "torch")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def resolve(name: str) -> str:
    """'auto' -> torch when it is installed, else numpy; a named backend is checked to be usable."""
    if name == "auto":
        return "torch" if torch_available() else "numpy"
    if name == "torch" and not torch_available():
        raise RnnlabError("backend 'torch' needs PyTorch: pip install -c constraints.txt 'rnnlab[torch]'")
    if name not in BACKENDS:
        raise RnnlabError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


def resolve_device(device: str, backend: str = "auto") -> str:
    """'auto' -> 'cuda' when the backend is torch and CUDA is present (the book's `try_gpu()`), else 'cpu';
    any other device is returned as given."""
    if device != "auto":
        return device
    if resolve(backend) == "torch":
        import torch
        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def device_of(backend) -> str:
    """The device a backend runs on, as text ('cpu', 'cuda:0', ...)."""
    return str(getattr(backend, "device", "cpu"))


def make_backend(name: str, params: dict, activation: str = "tanh", device: str = "cpu",
                 onehot_input: bool = False, torch_impl: str = "fused", matmul_dtype: str = "same",
                 dropout: float = 0.0):
    """Build a backend holding `params` (numpy arrays, copied).

    On torch, `torch_impl` picks the fused hand-written BPTT (the default, fastest exact path; for the book's
    one-layer RNN without dropout only, other networks take autograd), autograd, or autograd compiled by
    torch.compile;
    `matmul_dtype="bfloat16"` trains with bf16 matmul operands and float32 master weights: hand-written in the
    fused path, by torch.autocast in the others.
    """
    name = resolve(name)
    device = resolve_device(device, name)
    if name == "numpy":
        if device != "cpu" or matmul_dtype != "same":
            raise RnnlabError("the numpy backend runs on the CPU in the parameters' dtype only")
        from .numpy_backend import NumpyBackend
        return NumpyBackend(params, activation, onehot_input)
    from .. import cells
    if torch_impl == "fused" and not onehot_input and not dropout and cells.describe(params).is_book_rnn:
        import torch

        from .torch_fused import TorchFusedBackend
        low = torch.bfloat16 if matmul_dtype == "bfloat16" else None
        return TorchFusedBackend(params, activation, device, low)
    if torch_impl == "compile" and not onehot_input:
        from .torch_compiled import TorchCompiledBackend
        return TorchCompiledBackend(params, activation, device, matmul_dtype)
    from .torch_backend import TorchBackend
    return TorchBackend(params, activation, device, onehot_input, matmul_dtype)
