"""Backends: the same model on different array libraries.

`numpy` is the reference and the teaching code (hand-written BPTT, no autograd); `torch` differentiates the
same forward math with autograd, on CPU or CUDA; `jax` differentiates it with jax.value_and_grad, compiled by
XLA, on CPU or a GPU. All take the parameters as a dict of numpy arrays (so they start from identical weights)
and expose the same small interface:

    begin_state(batch_size) -> state (S, B, H), zeros; S = layers (x2 for the LSTM's cell states)
    loss_and_grads(X, Y, state, masks=None, weight_masks=None) -> (mean loss, grads dict, new state)
                                               # state detached; masks: (L, T, B, H) dropout masks or None;
                                               # weight_masks: {W_h* name: (H, H) weight-drop mask} or None
    token_nll(X, Y, state) -> (per-prediction NLL (T*B,) float64 numpy, new state)   # no gradients; in
                                               # the matmul dtype the backend trains with (bf16 or not)
    step(token_ids, state) -> (logits as numpy (B, V), new state)       # one decoding step
    decoder() -> a `step` callback, possibly precomputed for the current weights
    update(fn)                              # parameters = fn(parameters): an optimizer step, applied
    numpy_params() -> dict of numpy arrays

The network (cell, depth, input) is read from the parameter names (`cells.describe`). Gradients are
arrays of the backend's own kind; the backend-neutral `optim` code computes new parameters from them and
the backend applies them with `update`: no caller changes a backend's arrays.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re

from ..errors import RnnlabError

BACKENDS = ("numpy", "torch", "jax")
_NEEDS = {"torch": "PyTorch", "jax": "JAX"}


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def jax_available() -> bool:
    return importlib.util.find_spec("jax") is not None


def resolve(name: str) -> str:
    """'auto' -> torch when it is installed, else numpy; a named backend is checked to be usable."""
    if name == "auto":
        return "torch" if torch_available() else "numpy"
    if name not in BACKENDS:
        raise RnnlabError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name in _NEEDS and importlib.util.find_spec(name) is None:
        raise RnnlabError(f"backend {name!r} needs {_NEEDS[name]}: pip install -c constraints.txt 'rnnlab[{name}]'")
    return name


def resolve_device(device: str, backend: str = "auto") -> str:
    """'auto' -> 'cuda' when the backend is torch and CUDA is present (the book's `try_gpu()`), or the backend
    is jax and jax has a GPU, else 'cpu'; any other device is returned as given."""
    if device != "auto":
        return device
    backend = resolve(backend)
    if backend == "torch":
        import torch
        if torch.cuda.is_available():
            return "cuda"
    if backend == "jax":
        from .jax_backend import jax_has_gpu
        if jax_has_gpu():
            return "cuda"
    return "cpu"


DEVICES = "cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(device: str, backend: str = "auto") -> None:
    """Refuse, before any work, a device rnnlab does not run on (anything but auto, cpu, cuda and cuda:N,
    whatever the backend: mps, MPS, cuda:x, '') or this machine lacks, checked with jax for the jax backend
    and with torch otherwise. The numpy backend runs on the CPU only."""
    if _DEVICE.fullmatch(device) is None:
        raise RnnlabError(f"unknown device {device!r}: rnnlab runs on {DEVICES} (auto picks one)")
    if device in ("cpu", "auto"):
        return
    if backend == "numpy":
        raise RnnlabError(f"--device {device}: the numpy backend runs on the CPU only (--backend torch or jax "
                          "for CUDA)")
    if backend == "jax":
        resolve(backend)                                 # JAX is installed, or the error naming the extra
        from .jax_backend import jax_device
        jax_device(device)
        return
    try:
        import torch

        from .torch_backend import _device
    except ImportError:
        raise RnnlabError(f"--device {device} needs PyTorch: pip install -c constraints.txt 'rnnlab[torch]'") \
            from None
    kind = _device(device)
    if kind.type != "cuda":
        raise RnnlabError(f"--device {device}: rnnlab runs on cpu, cuda or cuda:N")
    if kind.index is not None and kind.index >= torch.cuda.device_count():
        raise RnnlabError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")


MAX_THREADS = 8


@functools.cache
def default_threads() -> int:
    """Threads for torch's CPU kernels when none are given: the CPUs this process may run on, less the ones
    other processes are busy on right now (their share on these CPUs), at least 1 and at most MAX_THREADS.

    torch's own default, one thread per core, collapses on a busy machine: every parallel matmul waits for
    its slowest thread, and a thread that waits for a core stalls them all (a GRU run fell from 63K to 423
    tokens/s). Beyond about 8 threads the small matmuls of a recurrent step (B x H by H x H, one per time
    step) stop scaling, so more only add contention. Computed once per process: by a later call (a
    rollback's new backend) the process's own threads would count against it. The ranks torchrun starts on
    one machine (LOCAL_WORLD_SIZE) start together and cannot see each other's load: they share the CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if ranks > 1:
        return max(1, min(cpus // ranks, MAX_THREADS))
    busy = other_runnable() * cpus / max(os.cpu_count() or cpus, cpus)
    return max(1, min(cpus - round(busy), MAX_THREADS))


def other_runnable(samples: int = 5, interval: float = 0.01) -> float:
    """How many other tasks are running or waiting for a CPU now: the median over a few samples of the
    kernel's count of runnable tasks (/proc/loadavg), less this process. Not the load average: that lags by
    minutes, so a run started just after another would count the finished one. Where /proc is missing, the
    1-minute load average (0 where that is missing too)."""
    import statistics
    import time
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            break
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return max(statistics.median(counts), 0)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def set_threads(threads: int, backend: str = "auto", device: str = "auto") -> int | None:
    """Set the number of threads torch's CPU kernels use: `threads`, or with 0 `default_threads()`. Returns
    the count set, or None where it does not apply (numpy, jax, or torch on a GPU)."""
    if threads < 0:
        raise RnnlabError(f"--threads must be >= 0, got {threads}")
    if resolve(backend) != "torch" or resolve_device(device, "torch") != "cpu":
        return None
    import torch
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


@contextlib.contextmanager
def denormals_flushed(backend):
    """While a torch backend on the CPU works, have the CPU treat denormal floats (below 1.2e-38 in float32)
    as zero. A recurrent net's gradients and Adam's moments drift into that range early in training, where
    x86 CPUs compute many times slower: the first 150 minibatches of a GRU (H=512, B=32, T=64) trained at
    10.3K tokens/s without this and 14.2K with it on this project's 2-core CPU. Values that small are below
    every tolerance rnnlab tests or reports. The setting is the processor's, for the whole process (numpy
    too), so it is set only around the work and cleared after; other backends are left alone."""
    if not (getattr(backend, "name", "").startswith("torch") and device_of(backend) == "cpu"):
        yield
        return
    import torch
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def device_of(backend) -> str:
    """The device a backend runs on, as text ('cpu', 'cuda:0', ...)."""
    return str(getattr(backend, "device", "cpu"))


def matmul_dtype_of(backend) -> str:
    """The dtype a backend's matmuls take their operands in, as text: 'bfloat16' for a torch path built with
    bf16 matmuls (it trains and scores with them), else its parameters' ('float32', 'float64')."""
    if getattr(backend, "autocast", False) or getattr(backend, "low_precision", False):
        return "bfloat16"
    return str(backend.dtype).removeprefix("torch.")


TORCH_IMPLS = ("auto", "fused", "autograd", "compile", "nn")


def masked_params(params: dict, weight_masks: dict | None, convert=lambda m, p: m) -> dict:
    """`params` with the weights named in `weight_masks` multiplied by their masks (weight drop), as new
    arrays: the backend's own weights are never changed. `convert` turns a numpy mask into the kind of
    array the parameter is."""
    if not weight_masks:
        return params
    return {name: p * convert(weight_masks[name], p) if name in weight_masks else p for name, p in params.items()}


def torch_paths(params: dict, onehot_input: bool = False) -> tuple[str, ...]:
    """The torch paths that can run the network of `params`, fastest first on the CPU: the fused
    hand-written BPTT runs the book variant of every cell, depth and input except the literal one-hot matmul;
    nn (torch.nn's layers) runs the nn cell variant only; autograd runs everything; compile runs what autograd
    does except the literal one-hot matmul."""
    from .. import cells
    arch = cells.describe(params)
    fused = not onehot_input and arch.variant == "book"
    return (("fused",) if fused else ()) + (("nn",) if arch.variant == "nn" else ()) + ("autograd",) \
        + (() if onehot_input else ("compile",))


_PATH_LIMITS = {"fused": "the fused path runs the book variant of each cell (not --cell-variant nn), without "
                         "the literal one-hot matmul",
                "nn": "the nn path runs torch.nn's cells: train with --cell-variant nn",
                "compile": "the compile path does not run the literal one-hot matmul"}


def make_backend(name: str, params: dict, activation: str = "tanh", device: str = "cpu",
                 onehot_input: bool = False, torch_impl: str = "auto", matmul_dtype: str = "same",
                 dropout: float = 0.0):
    """Build a backend holding `params` (numpy arrays, copied). Its `name` is the exact path that runs:
    numpy, jax, torch-fused, torch-nn, torch-autograd or torch-compile.

    On torch, `torch_impl` picks the path: auto = the fused hand-written BPTT (the fastest exact path) for
    every network of the book's cells (`torch_fused` for the §8.5 model without dropout, `torch_gated` for
    the rest), torch.nn's layers for the nn cell variant, autograd for the literal one-hot matmul; fused, nn,
    autograd or compile by name, which is an error for a network the path cannot run.
    `matmul_dtype="bfloat16"` trains with bf16 matmul operands and float32 master weights: hand-written in the
    fused path, by torch.autocast in the others.
    """
    name = resolve(name)
    device = resolve_device(device, name)
    check_device(device, name)
    if name == "jax":
        if matmul_dtype != "same":
            raise RnnlabError("the jax backend computes in the parameters' dtype (no --matmul-dtype bfloat16)")
        from .jax_backend import JaxBackend
        return JaxBackend(params, activation, device, onehot_input)
    if name == "numpy":
        if device != "cpu" or matmul_dtype != "same":
            raise RnnlabError("the numpy backend runs on the CPU in the parameters' dtype only")
        from .numpy_backend import NumpyBackend
        return NumpyBackend(params, activation, onehot_input)
    if torch_impl not in TORCH_IMPLS:
        raise RnnlabError(f"unknown --torch-impl {torch_impl!r}; choose from {', '.join(TORCH_IMPLS)}")
    can = torch_paths(params, onehot_input)
    if torch_impl == "auto":
        torch_impl = can[0]
    elif torch_impl not in can:
        raise RnnlabError(f"--torch-impl {torch_impl} cannot run this model ({_PATH_LIMITS[torch_impl]}); it can "
                          f"run on: {', '.join(can)}")
    if torch_impl == "fused":
        import torch

        from .. import cells
        from .torch_fused import TorchFusedBackend
        from .torch_gated import TorchGatedBackend
        low = torch.bfloat16 if matmul_dtype == "bfloat16" else None
        book_model = cells.describe(params).is_book_rnn and not dropout      # the §8.5 model's own path
        return (TorchFusedBackend if book_model else TorchGatedBackend)(params, activation, device, low)
    if torch_impl == "nn":
        from .torch_nn import TorchNNBackend
        return TorchNNBackend(params, activation, device, onehot_input, matmul_dtype)
    if torch_impl == "compile":
        from .torch_compiled import TorchCompiledBackend
        return TorchCompiledBackend(params, activation, device, matmul_dtype)
    from .torch_backend import TorchBackend
    return TorchBackend(params, activation, device, onehot_input, matmul_dtype)
