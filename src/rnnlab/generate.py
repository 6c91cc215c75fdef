"""Decoding, written once over a step callback: warm up on a prefix, then emit tokens one at a time.

    step(token_ids (B,), state) -> (logits (B, V) numpy, state)     state: (S, B, ...), batch on axis 1

Greedy decoding (temperature 0) is the book's `predict_ch8`; temperature T > 0 samples from
softmax(logits / T) with an explicit numpy Generator, so a seed reproduces the text. Any backend, or a fake
model in the tests, provides `step`.

Token ids in `never_sample` (such as `<unk>`, which stands for text the model cannot spell) are never emitted,
by sampling or by argmax; a trained model's argmax never picks `<unk>` anyway, so the book's greedy outputs
are unchanged. Scores are shifted by their maximum before dividing by T, so any T > 0 is safe: a tiny T is
the argmax over the allowed tokens. A model whose scores stop being finite is an error, not a text.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import RnnlabError


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator | None, never=()) -> np.ndarray:
    """(B, V) logits -> (B,) next tokens: argmax, or a sample at the given temperature; no id in `never` is
    ever picked."""
    z = np.array(logits, dtype=np.float64)
    if not np.isfinite(z).all():
        raise RnnlabError("the model produced non-finite scores (NaN or infinity): its weights have diverged; "
                          "retrain it with a smaller --lr or with clipping (--clip)")
    if len(never):
        z[:, list(never)] = -np.inf
    best = z.max(axis=1, keepdims=True)
    if not np.isfinite(best).all():
        raise RnnlabError("no token may be generated: the model's vocabulary holds only tokens never emitted")
    if temperature == 0:
        return z.argmax(axis=1)
    with np.errstate(over="ignore", under="ignore"):     # a far-off score becomes -inf: probability 0
        z -= best                                        # the best allowed token scores 0, all others <= 0
        p = np.exp(z / temperature)                      # in [0, 1], exactly 1 at the best token
    cdf = np.cumsum(p, axis=1)
    u = rng.random((len(cdf), 1)) * cdf[:, -1:]           # inverse-CDF sampling, one uniform per row
    chosen = (cdf <= u).sum(axis=1)                      # a token of probability 0 is never landed on
    last = p.shape[1] - 1 - (p[:, ::-1] > 0).argmax(axis=1)   # u rounded up to the total: the last possible
    return np.where(chosen < p.shape[1], chosen, last)


def generate(step, state, prefix_ids, num_preds: int, temperature: float = 0.0,
             rng: np.random.Generator | None = None, never_sample=()) -> np.ndarray:
    """Continue `prefix_ids` by `num_preds` tokens for every row of `state`.

    Returns (B, len(prefix) + num_preds) token ids, the prefix included, like the book's `predict_ch8`.
    Token ids in `never_sample` (such as `<unk>`) are never emitted, whatever the temperature.
    """
    if len(prefix_ids) == 0:
        raise RnnlabError("the prefix is empty: give at least one character to warm up on")
    if not 0 <= temperature < math.inf:               # also refuses nan
        raise RnnlabError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        rng = np.random.default_rng()
    B = state.shape[1]
    out = np.empty((B, len(prefix_ids) + num_preds), dtype=np.int64)
    out[:, : len(prefix_ids)] = prefix_ids
    # 1) warm up: run the state through every prefix token but the last, ignoring the outputs
    for tok in prefix_ids[:-1]:
        _, state = step(np.full(B, tok), state)
    # 2) decode: feed the latest token, pick the next from the logits
    for i in range(len(prefix_ids), out.shape[1]):
        logits, state = step(out[:, i - 1], state)
        out[:, i] = pick(logits, temperature, rng, never_sample)
    return out


def predict(backend, vocab, prefix_tokens, num_preds: int, temperature: float = 0.0,
            rng=None, num_samples: int = 1, joiner: str = "") -> list[str]:
    """Text continuations of a tokenized prefix from a backend (the book's `predict_ch8` when greedy)."""
    ids = vocab[list(prefix_tokens)]
    out = generate(backend.decoder(), backend.begin_state(num_samples), ids, num_preds, temperature, rng,
                   never_sample=[vocab.unk])
    return [joiner.join(vocab.to_tokens(list(row))) for row in out]
