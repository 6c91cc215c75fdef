"""Decoding, written once over a step callback: warm up on a prefix, then emit tokens one at a time.

    step(token_ids (B,), state) -> (logits (B, V) numpy, state)     state: (S, B, ...), batch on axis 1

Greedy decoding (temperature 0) is the book's `predict_ch8`; temperature T > 0 samples from
softmax(logits / T) with an explicit numpy Generator, so a seed reproduces the text. Any backend, or a fake
model in the tests, provides `step`.
"""
from __future__ import annotations

import numpy as np

from .errors import RnnlabError


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> np.ndarray:
    """(B, V) logits -> (B,) next tokens: argmax, or a sample at the given temperature."""
    if temperature == 0:
        return np.asarray(logits).argmax(axis=1)
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    u = rng.random((len(cdf), 1)) * cdf[:, -1:]           # inverse-CDF sampling, one uniform per row
    return np.minimum((cdf <= u).sum(axis=1), cdf.shape[1] - 1)


def generate(step, state, prefix_ids, num_preds: int, temperature: float = 0.0,
             rng: np.random.Generator | None = None, never_sample=()) -> np.ndarray:
    """Continue `prefix_ids` by `num_preds` tokens for every row of `state`.

    Returns (B, len(prefix) + num_preds) token ids, the prefix included, like the book's `predict_ch8`.
    Token ids in `never_sample` (such as `<unk>`) are never drawn when sampling; greedy decoding is
    left exactly as the book's argmax.
    """
    if len(prefix_ids) == 0:
        raise RnnlabError("the prefix is empty: give at least one character to warm up on")
    if not temperature >= 0:                          # also refuses nan
        raise RnnlabError(f"temperature must be >= 0, got {temperature}")
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
        if temperature > 0 and len(never_sample):
            logits = np.array(logits, dtype=np.float64)
            logits[:, list(never_sample)] = -np.inf
        out[:, i] = pick(logits, temperature, rng)
    return out


def predict(backend, vocab, prefix_tokens, num_preds: int, temperature: float = 0.0,
            rng=None, num_samples: int = 1, joiner: str = "") -> list[str]:
    """Text continuations of a tokenized prefix from a backend (the book's `predict_ch8` when greedy)."""
    ids = vocab[list(prefix_tokens)]
    out = generate(backend.decoder(), backend.begin_state(num_samples), ids, num_preds, temperature, rng,
                   never_sample=[vocab.unk])
    return [joiner.join(vocab.to_tokens(list(row))) for row in out]
