"""An interpolated Kneser–Ney n-gram model: the count-based baseline every network result is printed beside.

Shape legend: N = tokens, V = vocab_size, n = order.

Chen & Goodman's interpolated Kneser–Ney with one absolute discount per order, D = n1 / (n1 + 2 n2)
(n1, n2: how many n-grams of that order occur once, twice; 0.5 when none occurs once). For a context h of
k-1 tokens and its shortened context h' (h without its first token):

    P_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k * N1+(h .) * P_{k-1}(w | h')) / c_k(h .)     if c_k(h .) > 0
               = P_{k-1}(w | h')                                                               otherwise
    P_0(w)     = 1 / V

c_n are raw counts at the highest order; below it, c_k(h w) is the number of distinct tokens seen before
h w (the continuation count, Kneser–Ney's key idea). N1+(h .) is the number of distinct w after h, and
c_k(h .) the sum of c_k(h w) over w. Held-out tokens are scored like the networks score them: tokens[1:] of
one stream, each given everything before it, here its last n-1 tokens (fewer at the start).

Counting is vectorised: an n-gram is one int64 key (base-V digits), counted with `np.unique` and looked up
with `np.searchsorted`, so fitting a million tokens takes seconds.
"""
from __future__ import annotations

import math

import numpy as np

from . import evaluate
from .errors import RnnlabError


KEY_BITS = 62          # an n-gram key is < V ** n <= 2 ** 62: int64 with room for the arithmetic on it


def max_order(vocab_size: int) -> int:
    """The highest order whose keys fit over V >= 2 token types: the largest n with n * log2(V) < KEY_BITS
    (compared in logarithms, so a huge order costs nothing to refuse)."""
    n = math.floor(KEY_BITS / math.log2(vocab_size))
    return n - 1 if n * math.log2(vocab_size) >= KEY_BITS else n


def _keys(tokens: np.ndarray, k: int, V: int) -> np.ndarray:
    """(N - k + 1,) int64 keys of every k-gram, digits base V, oldest token most significant."""
    keys = np.zeros(len(tokens) - k + 1, dtype=np.int64)
    for i in range(k):
        keys = keys * V + tokens[i: len(tokens) - k + 1 + i]
    return keys


class _Table:
    """Sorted keys with values, looked up many at a time (0 for a missing key)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        self.keys, self.values = keys, values

    def __getitem__(self, query: np.ndarray) -> np.ndarray:
        if len(self.keys) == 0:
            return np.zeros(len(query), dtype=self.values.dtype)
        i = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return np.where(self.keys[i] == query, self.values[i], 0)


class KneserNey:
    """Interpolated Kneser–Ney of a given order over token ids in [0, V)."""

    def __init__(self, order: int, vocab_size: int):
        if order < 1:
            raise RnnlabError(f"--order must be >= 1, got {order}")
        if order * math.log2(max(vocab_size, 1)) >= KEY_BITS:     # V ** order keys overflow int64
            raise RnnlabError(f"--order {order} over {vocab_size} token types is too large to count (at most "
                              f"{max_order(vocab_size)})")
        self.order, self.V = order, vocab_size
        self.levels: list[dict] = []

    def fit(self, tokens: np.ndarray) -> "KneserNey":
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) < self.order:
            raise RnnlabError(f"{len(tokens)} training tokens are too few for an order-{self.order} model")
        V, levels = self.V, []
        for k in range(1, self.order + 1):
            if k == self.order:                                       # raw counts at the top
                keys, counts = np.unique(_keys(tokens, k, V), return_counts=True)
            else:                                                     # continuation counts below it
                longer = np.unique(_keys(tokens, k + 1, V))           # distinct (k+1)-grams
                keys, counts = np.unique(longer % V ** k, return_counts=True)
            contexts = keys // V                                      # h of each h w
            ctx_keys, first = np.unique(contexts, return_index=True)
            totals = np.add.reduceat(counts, first)                   # c_k(h .)
            distinct = np.diff(np.append(first, len(keys)))           # N1+(h .)
            n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
            discount = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5         # D > 0 keeps mass for unseen w
            levels.append({"counts": _Table(keys, counts), "totals": _Table(ctx_keys, totals),
                           "distinct": _Table(ctx_keys, distinct), "D": float(discount)})
        self.levels = levels
        return self

    def probs(self, tokens: np.ndarray) -> np.ndarray:
        """P(tokens[t] | tokens[:t]) for t = 1 .. N-1: (N - 1,) probabilities."""
        tokens = np.asarray(tokens, dtype=np.int64)
        V, N = self.V, len(tokens)
        p = np.full(N - 1, 1.0 / V)                                   # P_0
        for k, level in enumerate(self.levels, start=1):
            # positions t >= k - 1 have a full (k-1)-token context; targets are tokens[1:]
            start = max(k - 1, 1)
            if start > N - 1:
                break                                                 # the stream is shorter than k
            grams = _keys(tokens, k, V)[start - (k - 1):]             # k-grams ending at tokens[start:]
            contexts = grams // V
            c_hw = level["counts"][grams].astype(np.float64)
            c_h = level["totals"][contexts].astype(np.float64)
            n_h = level["distinct"][contexts].astype(np.float64)
            lower = p[start - 1:]
            seen = c_h > 0
            mixed = (np.maximum(c_hw - level["D"], 0) + level["D"] * n_h * lower) / np.where(seen, c_h, 1)
            p[start - 1:] = np.where(seen, mixed, lower)
        return p

    def score(self, tokens: np.ndarray) -> dict:
        """Held-out perplexity and bits per token of one stream, as `evaluate.score_stream` reports them."""
        if len(tokens) < 2:
            raise RnnlabError("need at least 2 tokens to score")
        return evaluate.summarize(float(-np.log(self.probs(tokens)).sum()), len(tokens) - 1)
