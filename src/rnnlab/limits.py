"""Memory limits: what a size will allocate, estimated and checked before anything is allocated.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, L = num_layers,
E = embed_size, G = gates per cell (rnn 1, gru 3, lstm 4).

A flag such as `--num-hiddens 1000000000` would otherwise ask numpy for hundreds of GiB, and the machine
would swap or the process be killed long after the user typed it. The estimates here are plain arithmetic on
Python ints (no array is built, nothing overflows, a size of 10**30 costs nothing to check). They count the
large buffers from above, within about 1.5x of what the reference backend is measured to hold, and `check`
compares them with the physical memory: what it refuses cannot fit, or would leave nothing to spare.
"""
from __future__ import annotations

import os
from decimal import Decimal

from .cells import GATES
from .errors import RnnlabError

OPTIMIZER_BUFFERS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
FALLBACK_MEMORY = 1 << 40          # where the OS does not say: refuse only what no ordinary machine has
ACTIVATION_COPIES = 6              # per gate and step kept for BPTT: inputs, pre-activations, states, grads
LOGIT_COPIES = 4                   # logits, softmax, their gradient, the output layer's temporaries
BYTES_PER_GENERATED = 24           # int64 token id + its text + its JSON, per sample and position
BYTES_PER_ROW_TOKEN = 48           # one row converted to text at a time: numpy scalars and list cells


def memory_bytes() -> int:
    """Total physical memory of this machine in bytes."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY
    return total if total > 0 else FALLBACK_MEMORY


def num_params(vocab_size: int, num_hiddens: int, num_layers: int = 1, cell: str = "rnn",
               embed_size: int = 0, cell_variant: str = "book") -> int:
    """How many numbers `cells.param_shapes` describes, in closed form (no loop over the layers)."""
    V, H, L, E, G = vocab_size, num_hiddens, num_layers, embed_size, len(GATES[cell])
    biases = 2 if cell_variant == "nn" else 1                         # b_* [, b_h*] per gate
    first = (E or V) * G * H + H * G * H + biases * G * H        # W_x*, W_h*, biases of layer 1
    above = (L - 1) * (2 * H * G * H + biases * G * H)           # layers 2..L take H inputs
    return V * E + first + above + H * V + V


def _itemsize(dtype: str) -> int:
    return 8 if dtype == "float64" else 4


def estimate_train_bytes(vocab_size: int, model_cfg, train_cfg) -> int:
    """Bytes a training run of these configs holds at its peak, roughly and from above."""
    m, t = model_cfg, train_cfg
    V, H, L, B, T = vocab_size, m.num_hiddens, m.num_layers, t.batch_size, t.num_steps
    G, item = len(GATES[m.cell]), _itemsize(t.dtype)
    # weights, gradients, optimizer buffers and the backend's own copy
    copies = 3 + OPTIMIZER_BUFFERS.get(t.optimizer, 2) + bool(t.ema)       # + the weight average
    weights = copies * num_params(V, H, L, m.cell, m.embed_size, m.cell_variant) * item
    activations = ACTIVATION_COPIES * T * B * H * (G + 1) * L * item
    logits = LOGIT_COPIES * T * B * V * item
    # greedy samples logged while training: int64 ids per prefix, decoded one row at a time
    longest = max((len(p) for p in t.prefixes), default=0)
    samples = len(t.prefixes) * (longest + t.num_preds) * BYTES_PER_GENERATED \
        + (longest + t.num_preds) * BYTES_PER_ROW_TOKEN
    return weights + activations + logits + samples


def estimate_generate_bytes(vocab_size: int, num_hiddens: int, num_layers: int, cell: str, num_samples: int,
                            num_chars: int, prefix_len: int) -> int:
    """Bytes `rnnlab generate` holds at its peak for `num_samples` rows of `prefix_len + num_chars` tokens,
    the weights already loaded: the token ids, their text, and one step's state and float64 scores."""
    S, N = num_samples, prefix_len + num_chars
    slices = 2 * num_layers if cell == "lstm" else num_layers
    per_step = S * (3 * vocab_size + 4 * slices * num_hiddens * len(GATES[cell])) * 8
    return S * N * BYTES_PER_GENERATED + N * BYTES_PER_ROW_TOKEN + per_step


def format_bytes(nbytes: int) -> str:
    """'209 GiB', '1.5 MiB', '8.08e+20 GiB': three significant digits, never a hundred of them (exact
    decimal arithmetic, so an int too large for a float is shown too)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{Decimal(int(nbytes)) / size:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def check(nbytes: int, what: str, fix: str = "make it smaller") -> None:
    """Raise RnnlabError naming `what` when `nbytes` exceeds this machine's physical memory."""
    available = memory_bytes()
    if nbytes > available:
        raise RnnlabError(f"{what} would need about {format_bytes(nbytes)}; this machine has "
                          f"{format_bytes(available)}: {fix}")


def check_train(vocab_size: int, model_cfg, train_cfg) -> None:
    """Refuse, before any weight is initialised, a run whose sizes cannot fit in memory."""
    m, t = model_cfg, train_cfg
    what = (f"--num-hiddens {m.num_hiddens} x --num-layers {m.num_layers} ({m.cell}"
            f"{f', --embed-size {m.embed_size}' if m.embed_size else ''}) over {vocab_size} token types, "
            f"trained with --batch-size {t.batch_size} x --num-steps {t.num_steps} and --num-preds "
            f"{t.num_preds}")
    check(estimate_train_bytes(vocab_size, m, t), what, "lower them")


def check_generate(vocab_size: int, model_cfg, num_samples: int, num_chars: int, prefix_len: int) -> None:
    """Refuse a generation whose output cannot fit in memory."""
    nbytes = estimate_generate_bytes(vocab_size, model_cfg.num_hiddens, model_cfg.num_layers, model_cfg.cell,
                                     num_samples, num_chars, prefix_len)
    check(nbytes, f"--num-samples {num_samples} x --num-chars {num_chars}", "lower them")
