"""Held-out evaluation: the split, and scoring a token stream with carried state.

Perplexity is exp of the token-weighted mean negative log-likelihood over the whole stream, never a mean of
per-batch perplexities. Bits per token = nats per token / ln 2 (bits per character for character tokens).
"""
from __future__ import annotations

import math

import numpy as np

from . import optim
from .errors import RnnlabError


def split(corpus: np.ndarray, val_fraction: float, max_tokens: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): val is the last `val_fraction` of the corpus; train is what precedes it, cut to
    its first `max_tokens` when that is positive. The held-out part never depends on `max_tokens`."""
    num_val = int(len(corpus) * val_fraction)
    if num_val < 2:
        raise RnnlabError(f"corpus of {len(corpus)} tokens leaves {num_val} held-out tokens at "
                          f"--val-fraction {val_fraction}; at least 2 are needed")
    train, val = corpus[:-num_val], corpus[-num_val:]
    if max_tokens > 0:
        train = train[:max_tokens]
    return train, val


def summarize(nll_sum: float, count: int) -> dict:
    """Nats, bits and perplexity per token from a summed NLL."""
    nats = nll_sum / count
    return {"tokens": int(count), "nats_per_token": nats, "bits_per_token": nats / math.log(2),
            "perplexity": math.exp(nats) if nats < 700 else math.inf}


def stream_nll(backend, tokens: np.ndarray, chunk: int = 256) -> np.ndarray:
    """-log P(tokens[t] | tokens[:t]) for t = 1 .. N-1, as (N - 1,) float64: one stream, batch 1, the state
    carried throughout."""
    if len(tokens) < 2:
        raise RnnlabError("need at least 2 tokens to score")
    state = backend.begin_state(1)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) - 1
    parts = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        nll, state = backend.token_nll(tokens[None, start:stop], tokens[None, start + 1:stop + 1], state)
        parts.append(nll)
    return np.concatenate(parts)


def score_stream(backend, tokens: np.ndarray, chunk: int = 256) -> dict:
    """Score tokens[1:] given everything before them: one stream, batch 1, the state carried throughout."""
    nll = stream_nll(backend, tokens, chunk)
    return summarize(float(nll.sum()), len(nll))


def score_mixture(backend, tokens: np.ndarray, ngram_model, weight: float = 0.5) -> dict:
    """Score the linear interpolation weight * P_model + (1 - weight) * P_ngram of the network and an n-gram
    fitted on the same training text (`ngram.KneserNey`). The two make different errors (the network
    generalises across contexts, the n-gram remembers exact ones), so the mixture usually beats both; by
    Jensen's inequality its loss is never above the weighted mean of theirs. Also returns each one's own
    perplexity on the same tokens."""
    if not 0.0 <= weight <= 1.0:
        raise RnnlabError(f"mixture weight must be in [0, 1], got {weight}")
    nll_model = stream_nll(backend, tokens)
    p_ngram = ngram_model.probs(tokens)
    p = weight * np.exp(-nll_model) + (1.0 - weight) * p_ngram
    n = len(p)
    return {**summarize(float(-np.log(p).sum()), n),
            "model_perplexity": summarize(float(nll_model.sum()), n)["perplexity"],
            "ngram_perplexity": summarize(float(-np.log(p_ngram).sum()), n)["perplexity"]}


def score_stream_dynamic(backend, tokens: np.ndarray, lr: float, num_steps: int = 64, decay: float = 0.0,
                         theta: float = 1.0) -> dict:
    """Dynamic evaluation (Krause et al., 2018): score the stream in segments of `num_steps` tokens and,
    after scoring each, take one SGD step on that segment's mean loss, so the model adapts to the text
    (its names, its recent words) as it reads it.

    Every token is still predicted before the model has trained on it: segment k is scored by the weights
    updated on segments 0..k-1 only. The update is W -= lr * clip(grad) + decay * (W - W_trained); `decay`
    pulls the weights back toward the trained ones. It changes the backend's weights in memory (never a
    checkpoint); load the model again to score statically.
    """
    if len(tokens) < 2:
        raise RnnlabError("need at least 2 tokens to score")
    if not lr > 0 or num_steps < 1 or decay < 0:
        raise RnnlabError(f"dynamic evaluation needs lr > 0, num_steps >= 1 and decay >= 0, "
                          f"got lr={lr}, num_steps={num_steps}, decay={decay}")
    trained = {k: optim.copy(p) for k, p in backend.params.items()} if decay else {}
    state = backend.begin_state(1)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) - 1
    total = 0.0
    for start in range(0, n, num_steps):
        stop = min(start + num_steps, n)
        X, Y = tokens[None, start:stop], tokens[None, start + 1:stop + 1]
        loss, grads, state = backend.loss_and_grads(X, Y, state)     # scored with the weights before the step
        total += loss * (stop - start)
        grads, _, _ = optim.clip(grads, theta)
        backend.update(lambda params: _dynamic_step(params, grads, lr, decay, trained))
    return summarize(total, n)


def _dynamic_step(params: dict, grads: dict, lr: float, decay: float, trained: dict) -> dict:
    """One step of dynamic evaluation: SGD, then a pull of `decay` back toward the trained weights."""
    new = optim.sgd(params, grads, lr)
    return {k: p - decay * (p - trained[k]) if k in trained else p for k, p in new.items()}
