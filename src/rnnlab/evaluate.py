"""Held-out evaluation: the split, and scoring a token stream with carried state.

Shape legend: K = pieces scored side by side (the batch), T = chunk (time steps per call), S = state slices,
H = num_hiddens, n = targets in a stream (tokens[1:]), M = columns a row of the batch reads.

Perplexity is exp of the token-weighted mean negative log-likelihood over the whole stream, never a mean of
per-batch perplexities. Bits per token = nats per token / ln 2 (bits per character for character tokens).

One stream read one token after another (batch 1) uses a small part of a CPU's or GPU's width. A long
stream is instead cut into K contiguous pieces scored side by side, one row of a batch each: the first piece
starts the stream as batch 1 does; every other piece starts from a zero state and first reads the W tokens
just before its own (its warm-up, whose predictions are not counted), so its first target is predicted from
W + 1 tokens of context rather than from all the text before. Every target is still counted exactly once.
`pieces=0` (auto) reads a stream of up to BATCH_ABOVE targets as one exact stream and a longer one as
AUTO_PIECES pieces; AUTO_PIECES is fixed, not fitted to the machine, so a figure is the same on every device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import optim
from .backends import matmul_dtype_of
from .errors import RnnlabError

BATCH_ABOVE = 50_000    # auto: one exact stream up to this many targets, AUTO_PIECES pieces above
AUTO_PIECES = 32
WARMUP = 256            # tokens a piece after the first reads, uncounted, before its first target
CHUNK = 256             # time steps per backend call


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


@dataclass(frozen=True)
class Layout:
    """A stream of n targets cut into K contiguous pieces: piece k scores targets starts[k] .. starts[k+1] - 1
    (target j is tokens[j + 1], predicted from tokens[:j + 1]) after reading its `warm[k]` tokens before
    them. Row k of the batch reads the tokens from first[k] = starts[k] - warm[k]; the rows are as long as
    one another, give or take one, because the first piece, which needs no warm-up, is W targets longer."""
    starts: np.ndarray          # (K + 1,) piece boundaries, 0 .. n
    warmup: int                 # W; 0 when K = 1

    @property
    def pieces(self) -> int:
        return len(self.starts) - 1

    @property
    def warm(self) -> np.ndarray:
        """(K,) tokens each row reads before its first counted target: 0 for the first, W for the others."""
        return np.where(np.arange(self.pieces) > 0, self.warmup, 0)

    @property
    def first(self) -> np.ndarray:
        """(K,) the target index at which each row starts reading."""
        return self.starts[:-1] - self.warm

    @property
    def lengths(self) -> np.ndarray:
        """(K,) columns each row reads: its warm-up and its piece."""
        return self.starts[1:] - self.first

    def counted(self, columns: np.ndarray) -> np.ndarray:
        """(K, M) whether column j of row k is a counted target (past the warm-up, before the row's end)."""
        return (columns >= self.warm[:, None]) & (columns < self.lengths[:, None])

    def columns(self, max_tokens: int = 0) -> int:
        """M: columns to read to count every target, or with `max_tokens` > 0 the most columns that count
        at most that many: the first targets of every piece, the same ones at every call."""
        M = int(self.lengths.max())
        if max_tokens <= 0 or max_tokens >= self.starts[-1]:
            return M

        def counted_in(m: int) -> int:               # targets the first m columns count, in O(K)
            return int(np.clip(m - self.warm, 0, self.lengths - self.warm).sum())
        low, high = 0, M                             # the most columns counting at most max_tokens
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if counted_in(mid) <= max_tokens else (low, mid - 1)
        return low


def plan(n: int, pieces: int = 0, warmup: int = WARMUP) -> Layout:
    """The layout of n targets in `pieces` pieces (0: auto, see the module's docstring), each but the first
    warmed up on the `warmup` tokens before it. There are never more pieces than leave each one target."""
    if pieces < 0 or warmup < 0:
        raise RnnlabError(f"scoring in pieces needs pieces >= 0 (0: auto) and a warm-up >= 0, got {pieces} "
                          f"and {warmup}")
    if pieces == 0:
        pieces = 1 if n <= BATCH_ABOVE else AUTO_PIECES
    K = max(1, min(pieces, n - warmup))
    if K == 1:
        return Layout(np.array([0, n]), 0)
    L, rest = divmod(n - warmup, K)
    sizes = L + (np.arange(K) < rest)                       # (K,) targets per piece
    sizes[0] += warmup                                      # the first piece needs no warm-up
    return Layout(np.concatenate([[0], np.cumsum(sizes)]), warmup)


def _chunks(backend, tokens, layout: Layout, num_columns: int, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(j, nll) for each backend call: its columns j (T,) and their NLL (K, T), T columns per call of the
    M = num_columns, the state (S, K, H) carried from call to call. A row past its end repeats its last
    token; those columns are not counted. The NLL is copied out of the backend's array, which may hold far
    more memory than its values (a torch tensor's block)."""
    K, first, last = layout.pieces, layout.first, layout.lengths - 1
    state = backend.begin_state(K)
    for start in range(0, num_columns, chunk):
        j = np.arange(start, min(start + chunk, num_columns))
        where = first[:, None] + np.minimum(j[None, :], last[:, None])               # (K, T) target indices
        X = np.asarray(tokens[where], dtype=np.int64)
        Y = np.asarray(tokens[where + 1], dtype=np.int64)
        nll, state = backend.token_nll(X, Y, state)                                   # (T*K,) time-major
        yield j, np.array(nll, dtype=np.float64).reshape(len(j), K).T


def _read(backend, tokens, layout: Layout, num_columns: int, chunk: int) -> np.ndarray:
    """NLL (K, M) of every column of every row, M = num_columns (see `_chunks`)."""
    return np.concatenate([nll for _, nll in _chunks(backend, tokens, layout, num_columns, chunk)], axis=1)


def _sums(backend, tokens, layout: Layout, chunk: int, *caps: int) -> list[tuple[float, int]]:
    """(NLL sum, targets) over the counted targets of the first `cap` columns, for each cap, reading the
    largest once: a figure in memory that does not grow with the stream."""
    sums = [[0.0, 0] for _ in caps]
    for j, nll in _chunks(backend, tokens, layout, max(caps), chunk):
        counted = layout.counted(j[None, :])                                          # (K, T)
        for total, cap in zip(sums, caps):
            inside = counted & (j[None, :] < cap)
            total[0] += float(nll[inside].sum())
            total[1] += int(inside.sum())
    return [(s, n) for s, n in sums]


def scored_nll(backend, tokens, pieces: int = 0, warmup: int = WARMUP, max_tokens: int = 0,
               chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, Layout]:
    """(nll, targets, layout): -log P(tokens[j + 1] | context) of the targets j counted, in stream order,
    as (m,) float64, and those j (m,). All n targets unless `max_tokens` caps them (`Layout.columns`)."""
    tokens = np.asarray(tokens)
    layout = _layout(tokens, pieces, warmup, max_tokens, chunk)
    M = layout.columns(max_tokens)
    nll = _read(backend, tokens, layout, M, chunk)                                    # (K, M)
    j = np.arange(M)[None, :]
    counted = layout.counted(j)                                                       # row-major = stream order
    return nll[counted], (layout.first[:, None] + j)[counted], layout


def _layout(tokens, pieces: int, warmup: int, max_tokens: int, chunk: int) -> Layout:
    """The layout of a stream to score, once the request is checked."""
    if len(tokens) < 2:
        raise RnnlabError("need at least 2 tokens to score")
    if chunk < 1 or max_tokens < 0:
        raise RnnlabError(f"scoring needs chunk >= 1 and max_tokens >= 0 (0: all), got {chunk} and {max_tokens}")
    return plan(len(tokens) - 1, pieces, warmup)


def stream_nll(backend, tokens, chunk: int = CHUNK, pieces: int = 0, warmup: int = WARMUP) -> np.ndarray:
    """-log P(tokens[t] | tokens[:t]) for t = 1 .. N-1, as (N - 1,) float64, the state carried throughout;
    as one stream (batch 1) or, for a long one or with `pieces` > 1, in pieces (see the module)."""
    return scored_nll(backend, tokens, pieces, warmup, chunk=chunk)[0]


def scoring(layout: Layout, backend) -> dict:
    """How a figure was scored, recorded beside it: pieces K (1: one exact stream), warm-up W, the matmul
    dtype, and the targets the stream holds (more than the figure's `tokens` when it was capped)."""
    return {"pieces": layout.pieces, "warmup": layout.warmup, "matmul_dtype": matmul_dtype_of(backend),
            "stream_tokens": int(layout.starts[-1])}


def score_stream(backend, tokens, chunk: int = CHUNK, pieces: int = 0, warmup: int = WARMUP,
                 max_tokens: int = 0) -> dict:
    """Score tokens[1:] given everything before them (within a piece's reach, for a stream read in pieces):
    perplexity, nats and bits per token over the targets counted, and `scoring`, how."""
    layout = _layout(tokens, pieces, warmup, max_tokens, chunk)
    (total, count), = _sums(backend, np.asarray(tokens), layout, chunk, layout.columns(max_tokens))
    return {**summarize(total, count), "scoring": scoring(layout, backend)}


def score_heldout(backend, val, cfg, last: bool) -> dict:
    """An evaluation while training (cfg: the TrainConfig): at most `cfg.val_max_tokens` targets of the
    held-out split, except at the run's `last` evaluation (its last epoch, or its time budget used up: the
    training loop decides, the same on every rank), which scores the whole split."""
    if not last or cfg.val_max_tokens <= 0:
        return score_stream(backend, val, pieces=cfg.eval_batch, warmup=cfg.eval_warmup,
                            max_tokens=0 if last else cfg.val_max_tokens)
    return _whole_and_capped(backend, np.asarray(val), cfg)


def _whole_and_capped(backend, val: np.ndarray, cfg) -> dict:
    """The last evaluation of a capped run: the whole split, and in `compared_nats` the loss on the targets
    every capped evaluation scored (a part of the same read), so that choosing the best model compares like
    with like."""
    layout = plan(len(val) - 1, cfg.eval_batch, cfg.eval_warmup)
    (total, count), (capped, n) = _sums(backend, val, layout, CHUNK, layout.columns(),
                                        layout.columns(cfg.val_max_tokens))
    return {**summarize(total, count), "scoring": scoring(layout, backend), "compared_nats": capped / n}


def score_mixture(backend, tokens, ngram_model, weight: float = 0.5, pieces: int = 0, warmup: int = WARMUP,
                  max_tokens: int = 0) -> dict:
    """Score the linear interpolation weight * P_model + (1 - weight) * P_ngram of the network and an n-gram
    fitted on the same training text (`ngram.KneserNey`). The two make different errors (the network
    generalises across contexts, the n-gram remembers exact ones), so the mixture usually beats both; by
    Jensen's inequality its loss is never above the weighted mean of theirs. Also returns each one's own
    perplexity on the same tokens."""
    check_weight(weight)
    nll_model, targets, layout = scored_nll(backend, tokens, pieces, warmup, max_tokens)
    return {**mixture(nll_model, ngram_model.probs(tokens)[targets], weight), "scoring": scoring(layout, backend)}


def check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise RnnlabError(f"mixture weight must be in [0, 1], got {weight}")


def mixture(nll_model: np.ndarray, p_ngram: np.ndarray, weight: float) -> dict:
    """The figures of weight * P_model + (1 - weight) * P_ngram over the same targets (the model's NLL and
    the n-gram's probabilities of each), with each one's own perplexity beside them."""
    p = weight * np.exp(-nll_model) + (1.0 - weight) * p_ngram
    n = len(p)
    return {**summarize(float(-np.log(p).sum()), n),
            "model_perplexity": summarize(float(nll_model.sum()), n)["perplexity"],
            "ngram_perplexity": summarize(float(-np.log(p_ngram).sum()), n)["perplexity"]}


def score_stream_dynamic(backend, tokens: np.ndarray, lr: float, num_steps: int = 64, decay: float = 0.0,
                         theta: float = 1.0, ngram_model=None, weight: float = 0.5, ms: dict | None = None) -> dict:
    """Dynamic evaluation (Krause et al., 2018): score the stream in segments of `num_steps` tokens and,
    after scoring each, take one gradient step on that segment's mean loss, so the model adapts to the text
    (its names, its recent words) as it reads it.

    Every token is still predicted before the model has trained on it: segment k is scored by the weights
    updated on segments 0..k-1 only. The step is plain SGD, W -= lr * clip(grad) + decay * (W - W_trained),
    or, given `ms` (`gradient_ms`: each weight's mean squared gradient on the training text), Krause et al.'s
    RMS rule, W -= lr * grad / (sqrt(ms) + RMS_FLOOR * m) + decay * r * (W - W_trained) with m the mean of
    sqrt(ms) and r = sqrt(ms) / m (at most 1 / decay): each weight moves by its own gradient scale, and the
    weights the training text moved most return fastest. `decay` pulls the weights back toward the trained
    ones. It changes the backend's weights in memory (never a checkpoint); load the model again to score
    statically. With an `ngram_model`, the figures are those of the adapted model's mixture with it
    (`score_mixture`'s `weight`).
    """
    how = {"scoring": scoring(plan(max(len(tokens) - 1, 1), pieces=1), backend)}
    if ngram_model is None:              # only the sum is needed: each segment's mean loss, no second forward
        n, total = len(tokens) - 1, 0.0
        for start, stop, loss, _ in _dynamic_segments(backend, tokens, lr, num_steps, decay, theta, ms, False):
            total += loss * (stop - start)
        return {**summarize(total, n), **how}
    check_weight(weight)
    nll = dynamic_nll(backend, tokens, lr, num_steps, decay, theta, ms)
    return {**mixture(nll, ngram_model.probs(tokens), weight), **how}


def dynamic_nll(backend, tokens: np.ndarray, lr: float, num_steps: int = 64, decay: float = 0.0,
                theta: float = 1.0, ms: dict | None = None) -> np.ndarray:
    """-log P(tokens[t] | tokens[:t]) for t = 1 .. N-1 under dynamic evaluation (`score_stream_dynamic`),
    as (N - 1,) float64."""
    nll = np.empty(max(len(tokens) - 1, 0))
    for start, stop, _, segment in _dynamic_segments(backend, tokens, lr, num_steps, decay, theta, ms, True):
        nll[start:stop] = segment
    return nll


def _dynamic_segments(backend, tokens, lr: float, num_steps: int, decay: float, theta: float, ms: dict | None,
                      per_token: bool) -> Iterator[tuple[int, int, float, np.ndarray | None]]:
    """Dynamic evaluation's loop: for each segment [start, stop) of targets, (start, stop, its mean loss, its
    per-token NLL when `per_token`, else None), scored with the weights before the step on it."""
    if len(tokens) < 2:
        raise RnnlabError("need at least 2 tokens to score")
    if not lr > 0 or num_steps < 1 or decay < 0:
        raise RnnlabError(f"dynamic evaluation needs lr > 0, num_steps >= 1 and decay >= 0, "
                          f"got lr={lr}, num_steps={num_steps}, decay={decay}")
    trained = {k: optim.copy(p) for k, p in backend.params.items()} if decay else {}
    step = _sgd_step(lr, decay, trained, theta) if ms is None else _rms_step(ms, lr, decay, trained)
    state = backend.begin_state(1)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) - 1
    for start in range(0, n, num_steps):
        stop = min(start + num_steps, n)
        X, Y = tokens[None, start:stop], tokens[None, start + 1:stop + 1]
        nll = backend.token_nll(X, Y, state)[0] if per_token else None     # the weights before the step
        loss, grads, state = backend.loss_and_grads(X, Y, state)
        backend.update(lambda params: step(params, grads))
        yield start, stop, loss, nll


MS_TOKENS = 20_000      # training tokens whose gradients set the RMS rule's per-weight scale
RMS_FLOOR = 0.05        # the RMS rule adds this fraction of the mean RMS to each weight's RMS: a weight whose
                        # gradient was ~0 on the training text (a saturated unit, a character it lacks) would
                        # otherwise take an unbounded step


def gradient_ms(backend, tokens: np.ndarray, num_steps: int = 64, max_tokens: int = MS_TOKENS) -> dict:
    """Each weight's mean squared gradient over segments of `num_steps` tokens of the training text (its last
    `max_tokens`: with the whole text trained on, the part just before the held-out split), read as one
    stream as dynamic evaluation reads: the per-weight scale of the RMS rule. Arrays of the backend's kind."""
    tokens = np.asarray(tokens, dtype=np.int64)[-(max_tokens + 1):]
    if len(tokens) < 2:
        raise RnnlabError("the RMS rule needs at least 2 training tokens")
    state, total, count = backend.begin_state(1), None, 0
    for start in range(0, len(tokens) - 1, num_steps):
        stop = min(start + num_steps, len(tokens) - 1)
        _, grads, state = backend.loss_and_grads(tokens[None, start:stop], tokens[None, start + 1:stop + 1], state)
        squares = {k: g * g for k, g in grads.items()}
        total = squares if total is None else {k: total[k] + squares[k] for k in total}
        count += 1
    return {k: v / count for k, v in total.items()}


def _sgd_step(lr: float, decay: float, trained: dict, theta: float):
    """The SGD rule's step: clipped SGD, then a pull of `decay` back toward the trained weights."""
    def step(params: dict, grads: dict) -> dict:
        grads, _, _ = optim.clip(grads, theta)
        new = optim.sgd(params, grads, lr)
        return {k: p - decay * (p - trained[k]) if k in trained else p for k, p in new.items()}
    return step


def _rms_step(ms: dict, lr: float, decay: float, trained: dict):
    """The RMS rule's step (see `score_stream_dynamic`), unclipped, its scales computed once."""
    rms = {k: v ** 0.5 for k, v in ms.items()}
    mean = sum(float(r.sum()) for r in rms.values()) / sum(int(np.prod(r.shape)) for r in rms.values())
    floor = RMS_FLOOR * mean + 1e-30
    scale = {k: 1.0 / (r + floor) for k, r in rms.items()}
    pull = {k: (r * (decay / max(mean, 1e-30))).clip(None, 1.0) for k, r in rms.items()} if decay else {}

    def step(params: dict, grads: dict) -> dict:
        new = {k: p - lr * grads[k] * scale[k] for k, p in params.items()}
        return {k: p - pull[k] * (p - trained[k]) if k in pull else p for k, p in new.items()}
    return step
