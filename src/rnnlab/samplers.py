"""Minibatch samplers with exactly the book's semantics, driven by an explicit `numpy.random.Generator`.

Shapes: corpus (N,) token indices; every minibatch is X, Y of shape (B, T), B = batch_size, T = num_steps,
with Y the tokens that follow X (Y[b, t] = corpus[i + 1] where X[b, t] = corpus[i]). Remainders are dropped.

Both samplers draw their randomness (offset, order) when called, not lazily while iterating, so the
generator's state after the call does not depend on how far the batches are consumed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

SAMPLINGS = ("sequential", "random", "legacy-random", "legacy-consecutive")
Batch = tuple[np.ndarray, np.ndarray]


def seq_data_iter_random(corpus: np.ndarray, batch_size: int, num_steps: int,
                         rng: np.random.Generator) -> Iterator[Batch]:
    """Random sampling: subsequences of length T start at a random offset in [0, T) and are shuffled.

    Within an epoch the subsequences are disjoint; neighbouring rows of consecutive minibatches are not
    neighbours in the text, so the hidden state is re-initialised for every minibatch.
    """
    corpus = corpus[int(rng.integers(0, num_steps)):]
    num_subseqs = (len(corpus) - 1) // num_steps  # -1: every X needs its Y
    initial_indices = rng.permutation(np.arange(0, num_subseqs * num_steps, num_steps))
    return _window_batches(corpus, initial_indices, batch_size, num_steps)


def _window_batches(corpus: np.ndarray, starts: np.ndarray, batch_size: int, num_steps: int) -> Iterator[Batch]:
    """Minibatches of B windows of T tokens, in the order of `starts` (already shuffled); whole ones only."""
    num_batches = len(starts) // batch_size
    steps = np.arange(num_steps)
    starts = starts[: num_batches * batch_size].reshape(num_batches, batch_size)
    return ((corpus[s[:, None] + steps].astype(np.int64), corpus[s[:, None] + steps + 1].astype(np.int64))
            for s in starts)


def seq_data_iter_sequential(corpus: np.ndarray, batch_size: int, num_steps: int,
                             rng: np.random.Generator) -> Iterator[Batch]:
    """Sequential partitioning: the text from a random offset in [0, T] is cut into B parallel streams.

    Row b of minibatch k+1 continues row b of minibatch k, so the hidden state can be carried across.
    (The book draws this offset with `random.randint(0, num_steps)`, which includes num_steps.)
    """
    offset = int(rng.integers(0, num_steps + 1))
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = corpus[offset: offset + num_tokens].reshape(batch_size, -1)
    Ys = corpus[offset + 1: offset + 1 + num_tokens].reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    return ((Xs[:, i: i + num_steps].astype(np.int64), Ys[:, i: i + num_steps].astype(np.int64))
            for i in range(0, num_steps * num_batches, num_steps))


def data_iter_random_legacy(corpus: np.ndarray, batch_size: int, num_steps: int,
                            rng: np.random.Generator) -> Iterator[Batch]:
    """The early notebook's random sampling (d2l-en, 2019): an offset in [0, T), then (N - offset - 1) // T - 1
    windows, one fewer than fit, shuffled; whole minibatches only. The state is reset for every minibatch."""
    offset = int(rng.integers(0, num_steps))
    num_examples = max((len(corpus) - offset - 1) // num_steps - 1, 0)
    starts = rng.permutation(np.arange(offset, offset + num_examples * num_steps, num_steps))
    return _window_batches(corpus, starts, batch_size, num_steps)


def data_iter_consecutive_legacy(corpus: np.ndarray, batch_size: int, num_steps: int,
                                 rng: np.random.Generator) -> Iterator[Batch]:
    """The early notebook's consecutive sampling: an offset in [0, T) (0.17's goes up to T), the text after
    it cut into B rows of (N - offset) // B tokens each, and (row length - 1) // T minibatches of T columns."""
    offset = int(rng.integers(0, num_steps))
    num_indices = ((len(corpus) - offset) // batch_size) * batch_size
    rows = corpus[offset: offset + num_indices].reshape(batch_size, -1)
    num_batches = max((rows.shape[1] - 1) // num_steps, 0)
    return ((rows[:, i: i + num_steps].astype(np.int64), rows[:, i + 1: i + 1 + num_steps].astype(np.int64))
            for i in range(0, num_steps * num_batches, num_steps))


def batches(corpus: np.ndarray, batch_size: int, num_steps: int, sampling: str,
            rng: np.random.Generator) -> Iterator[Batch]:
    """One epoch of minibatches from the named sampler."""
    if batch_size < 1 or num_steps < 1:
        raise ValueError(f"batch_size and num_steps must be >= 1, got {batch_size} and {num_steps}")
    iterators = {"random": seq_data_iter_random, "sequential": seq_data_iter_sequential,
                 "legacy-random": data_iter_random_legacy, "legacy-consecutive": data_iter_consecutive_legacy}
    if sampling not in iterators:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {SAMPLINGS}")
    return iterators[sampling](corpus, batch_size, num_steps, rng)


def min_tokens(batch_size: int, num_steps: int, sampling: str) -> int:
    """Fewest corpus tokens that give at least one minibatch whatever offset is drawn."""
    if sampling == "legacy-random":              # B windows after the largest offset, T - 1, and one spare
        return (batch_size + 2) * num_steps
    if sampling == "legacy-consecutive":         # rows of T + 1 tokens after the largest offset, T - 1
        return batch_size * (num_steps + 1) + num_steps - 1
    largest_offset = num_steps - 1 if sampling == "random" else num_steps
    return batch_size * num_steps + largest_offset + 1


def batches_per_epoch(num_tokens: int, batch_size: int, num_steps: int) -> int:
    """About how many minibatches an epoch of `num_tokens` has (the exact count depends on the offset
    drawn): what the learning-rate schedule, the progress bar and step counts measure an epoch in."""
    return max((num_tokens - 1) // (batch_size * num_steps), 1)
