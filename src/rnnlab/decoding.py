"""Decoding, written once over a step callback: warm up on a prompt, then choose tokens one at a time.

    step(token_ids (B,), state) -> (logits (B, V), state)      state: (S, B, ...), batch on axis 1

Any backend (numpy, torch, jax), or a fake model in the tests, provides `step`; nothing here knows which. The
state is only ever indexed along axis 1 (`state[:, rows]`), which every array library does alike.

How the next token is chosen, in order (`choose`):
  1. tokens in `never` (`<unk>`: text the model cannot spell) get probability 0;
  2. temperature 0 is the book's greedy argmax (`predict_ch8`); T > 0 divides the scores by T;
  3. top-k keeps the k most likely tokens, then top-p the smallest set of them whose probability reaches p;
  4. one uniform draw per continuation picks a token by inverse CDF.
Continuation i draws from its own generator, seeded by (seed, i), so it is the same text whether it is decoded
alone or as row i of a batch of n. Beam search (`beam_search`) is deterministic and keeps the `width` most
likely texts, reordering the hidden states by parent beam at every step.

`stream` yields the text as it is made, (continuation, piece) at a time, for the CLI and the HTTP server alike;
a stop text is cut off even when it straddles tokens, because a tail that could begin one is held back until
it is certain. Scores are float64 and shifted by their maximum, so any T > 0 is safe. A model whose scores stop
being finite is an error, not a text.

`continuations` makes the same texts whole, for callers that want them at the end (`LM.generate`): without
stop texts the tokens of every step go into one array. One greedy continuation, streamed or whole, goes
through `greedy_pieces`, which lets a step callback with a `greedy(feed, state, n, never) -> (tokens,
logits or None, state)` method (the numpy and jax backends' decoders) choose a chunk of tokens at a time in
its own loop: the numpy decoder's gives its steps' tokens bit for bit, the jax decoder's is one compiled
program, and either gives the same tokens however the text is cut into chunks.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from .errors import RnnlabError


class Piece(NamedTuple):
    """A piece of the text of continuation `sample` (in a batch of n, or the rank of a beam)."""
    sample: int
    text: str


# --- choosing the next token ----------------------------------------------------------------------------------

NON_FINITE = ("the model produced non-finite scores (NaN or infinity): its weights have diverged; retrain it "
              "with a smaller --lr or with clipping (--clip)")


def _scores(logits, never=()) -> np.ndarray:
    """(B, V) logits as float64 with the tokens in `never` at -inf; an error when they are not finite."""
    z = np.array(logits, dtype=np.float64)
    if not np.isfinite(z.sum()):                       # one reduction: a NaN or infinity anywhere shows
        raise RnnlabError(NON_FINITE)
    _mask(z.T, never)
    return z


def _mask(z_by_token: np.ndarray, never) -> None:
    """Put the tokens in `never` at -inf in float64 scores given as (V, B); an error when that leaves none."""
    if len(never):
        if len(set(never)) >= len(z_by_token):
            raise RnnlabError("no token may be generated: the model's vocabulary holds only tokens never "
                              "emitted")
        z_by_token[list(never)] = -np.inf


def _scores_by_token(logits, never=()) -> np.ndarray:
    """`_scores` as (V, B), C-contiguous. From float32 logits the float64 sum cannot overflow, so it is
    finite exactly when every score is, in any order of summation: the copy is made transposed at once."""
    logits = np.asarray(logits)
    if logits.dtype != np.float32:
        return np.ascontiguousarray(_scores(logits, never).T)
    z = np.array(logits.T, dtype=np.float64, order="C")
    if not np.isfinite(z.sum()):
        raise RnnlabError(NON_FINITE)
    _mask(z, never)
    return z


def truncate(z: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """(B, V) scores -> the same with every token outside the top k, then outside the top-p nucleus of what
    is left, at -inf. Ties are broken by token id, so exactly k tokens stay; the most likely always stays."""
    if not top_k and top_p >= 1:
        return z
    order = np.argsort(-z, axis=1, kind="stable")                       # (B, V) best first
    ranked = np.take_along_axis(z, order, axis=1)
    keep = np.isfinite(ranked)
    if top_k:
        keep[:, top_k:] = False
    if top_p < 1:
        with np.errstate(under="ignore"):
            p = np.where(keep, np.exp(ranked - ranked[:, :1]), 0.0)
        p /= p.sum(axis=1, keepdims=True)
        before = np.cumsum(p, axis=1) - p                                # probability of the better tokens
        keep &= before < top_p
    out = np.full_like(z, -np.inf)
    np.put_along_axis(out, order, np.where(keep, ranked, -np.inf), axis=1)
    return out


def _draw(p: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """(B,) tokens drawn by inverse CDF, one uniform in [0, 1) per row, from probabilities p given as (V, B),
    a column per row (each scaled so its best token is 1): the sums along the vocabulary run down the
    columns. A token of probability 0 is never drawn."""
    cdf = np.cumsum(p, axis=0)
    chosen = (cdf <= uniforms * cdf[-1]).sum(axis=0)
    if chosen.max() < len(p):
        return chosen
    last = len(p) - 1 - (p[::-1] > 0).argmax(axis=0)          # u rounded up to the total: the last possible
    return np.where(chosen < len(p), chosen, last)


def choose(logits, temperature: float, uniforms: np.ndarray | None = None, top_k: int = 0, top_p: float = 1.0,
           never=()) -> np.ndarray:
    """(B, V) logits -> (B,) next tokens: the argmax at temperature 0, else a draw from the tempered, then
    truncated, distribution (see the module docstring). Computed on the scores as (V, B), a column per row:
    the same numbers as along rows (maxima, sums in order), with the work spread over the batch."""
    if temperature == 0:
        return _scores(logits, never).argmax(axis=1)
    z = _scores_by_token(logits, never)
    with np.errstate(over="ignore", under="ignore"):     # a tiny T sends all but the best to -inf
        z -= z.max(axis=0)
        z /= temperature
        if top_k or top_p < 1:
            z = truncate(z.T, top_k, top_p).T
        return _draw(np.exp(z, out=z), uniforms)         # the best is at 0: the maximum `sample` subtracts


def pick(logits, temperature: float, rng: np.random.Generator | None, never=()) -> np.ndarray:
    """`choose` with the uniforms drawn from one generator, one per row."""
    uniforms = rng.random(len(logits)) if temperature else None
    return choose(logits, temperature, uniforms, never=never)


def log_softmax(logits, never=()) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 log-probabilities (those of `never` tokens renormalised away)."""
    z = _scores(logits, never)
    z -= z.max(axis=1, keepdims=True)
    with np.errstate(under="ignore"):
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# --- the book's form: token ids in, token ids out ---------------------------------------------------------------

def _check(prompt_ids, temperature: float) -> None:
    if len(prompt_ids) == 0:
        raise RnnlabError("the prompt is empty: give at least one character to warm up on")
    if not 0 <= temperature < math.inf:               # also refuses nan
        raise RnnlabError(f"temperature must be a finite number >= 0, got {temperature}")


def generate(step, state, prefix_ids, num_preds: int, temperature: float = 0.0,
             rng: np.random.Generator | None = None, never_sample=()) -> np.ndarray:
    """Continue `prefix_ids` by `num_preds` tokens for every row of `state`, as the book's `predict_ch8` does
    (every row warmed up on the whole prefix). Returns (B, len(prefix) + num_preds) ids, the prefix included."""
    _check(prefix_ids, temperature)
    if temperature > 0 and rng is None:
        rng = np.random.default_rng()
    B = state.shape[1]
    out = np.empty((B, len(prefix_ids) + num_preds), dtype=np.int64)
    out[:, : len(prefix_ids)] = prefix_ids
    for tok in prefix_ids[:-1]:                       # 1) warm up, ignoring the outputs
        _, state = step(np.full(B, tok), state)
    for i in range(len(prefix_ids), out.shape[1]):   # 2) feed the latest token, pick the next
        logits, state = step(out[:, i - 1], state)
        out[:, i] = pick(logits, temperature, rng, never_sample)
    return out


# --- text: stop strings and streaming ---------------------------------------------------------------------------

def find_stop(text: str, stops: Sequence[str], new: int = 0) -> int:
    """Where the stop text that is complete first in `text` begins (of two complete at the same character,
    the longer), or -1; only those ending after text[:new] are looked for (what came before was searched
    already). The first to be complete, not the first to begin: a continuation written a token at a time
    stops there, so the cut must not depend on how the text arrives (a stop "a" inside a longer stop
    "baa" ends the text "baa" after "b", in one piece or three)."""
    start = max(0, new - max(map(len, stops), default=0) + 1)
    hits = [(i + len(s), i) for s in stops if (i := text.find(s, start)) >= 0]       # (end, start)
    return min(hits, default=(0, -1))[1]


class Stopper:
    """One continuation's text, cut before the first stop text to be complete (`find_stop`). `feed` returns
    what is certain: everything but a tail that could still begin a stop text, which is held back until the
    next piece decides."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops, self.longest = tuple(stops), max(map(len, stops), default=0)   # longest: of a stop text
        self.text, self.sent, self.done = "", 0, False

    def feed(self, piece: str) -> str:
        before, self.text = self.text, self.text + piece
        cut = find_stop(self.text, self.stops, len(before))
        if cut >= 0:
            self.done = True
            return self._release(cut)
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        return "" if self.done else self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop text."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


def take(state, rows):
    """The state of the given batch rows (an index array; repeats allowed): every backend's arrays index alike."""
    return state[:, rows]


def warm_up(step, state, prompt_ids):
    """The state after the prompt's tokens but the last (the last is fed by the first decoding step)."""
    for tok in prompt_ids[:-1]:
        _, state = step(np.array([tok]), state)
    return state


class Uniforms:
    """The uniform draws of continuations 0..n-1, one per step each, continuation i's from its own generator
    seeded by (seed, i): drawn a block of steps at a time, which gives the same numbers as a draw per step."""
    BLOCK = 256

    def __init__(self, seed: int, n: int, steps: int):
        self.rngs = [np.random.default_rng([seed, i]) for i in range(n)]
        self.size = max(1, min(steps, self.BLOCK))
        self.used = self.size

    def next(self, rows: np.ndarray) -> np.ndarray:
        """This step's draw of each continuation in `rows`, (len(rows),)."""
        if self.used == self.size:
            self.block = np.stack([g.random(self.size) for g in self.rngs], axis=1)     # (steps, n)
            self.used = 0
        self.used += 1
        draws = self.block[self.used - 1]
        return draws if len(rows) == len(draws) else draws[rows]


def _choices(step, state, prompt_ids, num_preds: int, temperature: float, top_k: int, top_p: float,
             num_samples: int, seed: int, never, going=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tokens of `num_samples` continuations decoded as one batch: yields (rows, tokens) at each step,
    the continuations still going (in batch order) and the token each chose. After each yield, `going(rows,
    tokens)`, when given, says which rows go on (a bool mask); the others leave the batch."""
    _check(prompt_ids, temperature)
    state = take(warm_up(step, state, prompt_ids), np.zeros(num_samples, dtype=np.int64))
    draws = Uniforms(seed, num_samples, num_preds) if temperature else None
    rows = np.arange(num_samples)
    last = np.full(num_samples, prompt_ids[-1], dtype=np.int64)
    for _ in range(num_preds):
        logits, state = step(last, state)
        last = choose(logits, temperature, draws.next(rows) if draws else None, top_k, top_p, never)
        yield rows, last
        keep = going(rows, last) if going else None
        if keep is not None and not keep.all():
            rows, last, state = rows[keep], last[keep], take(state, np.flatnonzero(keep))
            if not len(rows):
                return


def stream(step, state, prompt_ids, token_text: Sequence[str], num_preds: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, stop: Sequence[str] = (), seed: int = 0,
           never=()) -> Iterator[Piece]:
    """Decode `num_samples` continuations of one prompt as one batch, yielding their text as it is made.

    `state` is a batch-1 initial state; the prompt is read once and its state copied to every row.
    `token_text[i]` is the text of token i as it continues a text (a character, or " word"). A continuation
    ends after `num_preds` tokens or before the first stop text; finished rows leave the batch. One greedy
    continuation goes through the step's own `greedy` loop where it has one, in chunks of FIRST_CHUNK tokens
    doubling up to LAST_CHUNK (`greedy_pieces`).
    """
    if temperature == 0 and num_samples == 1 and getattr(step, "greedy", None):     # the step's own loop
        for text in greedy_pieces(step, state, prompt_ids, token_text, num_preds, stop, never, FIRST_CHUNK):
            if text:
                yield Piece(0, text)
        return
    stoppers = [Stopper(stop) for _ in range(num_samples)]
    going = (lambda rows, _: np.array([not stoppers[r].done for r in rows])) if stop else None
    for rows, last in _choices(step, state, prompt_ids, num_preds, temperature, top_k, top_p, num_samples, seed,
                               never, going):
        texts = [token_text[t] for t in last.tolist()]
        if not stop:                                   # nothing to hold back: every token is final
            yield from map(Piece, rows.tolist(), texts)
            continue
        for r, text in zip(rows.tolist(), texts):
            piece = stoppers[r].feed(text)
            if piece:
                yield Piece(r, piece)
    for r, stopper in enumerate(stoppers):
        rest = stopper.flush()
        if rest:
            yield Piece(r, rest)


def joined(pieces, num_samples: int) -> list[str]:
    """The texts of `num_samples` continuations from their pieces (`stream`'s, or beam search's)."""
    parts: list[list[str]] = [[] for _ in range(num_samples)]
    for piece in pieces:
        parts[piece.sample].append(piece.text)
    return ["".join(part) for part in parts]


def continuations(step, state, prompt_ids, token_text: Sequence[str], num_preds: int, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, stop: Sequence[str] = (), seed: int = 0,
                  never=()) -> list[str]:
    """The continuations `stream` makes, each as one text (its pieces joined), made without the pieces where
    no text is held back: one greedy continuation by `greedy`, continuations without stop texts as a
    (steps, n) array of tokens joined at the end."""
    if temperature == 0 and num_samples == 1:
        return [greedy(step, state, prompt_ids, token_text, num_preds, stop, never)]
    if stop:
        return joined(stream(step, state, prompt_ids, token_text, num_preds, temperature, top_k, top_p, num_samples,
                             stop, seed, never), num_samples)
    steps = [last for _, last in _choices(step, state, prompt_ids, num_preds, temperature, top_k, top_p,
                                          num_samples, seed, never)]
    tokens = np.array(steps, dtype=np.int64).reshape(len(steps), num_samples)          # (steps, n)
    return ["".join([token_text[t] for t in row]) for row in tokens.T.tolist()]


# --- one continuation, greedy: the same text, made in chunks -------------------------------------------------

FIRST_CHUNK, LAST_CHUNK = 32, 1024    # tokens per call of a greedy loop: with stop texts doubling between these


def greedy_steps(step, feed, state, num_preds: int, never=()):
    """What a decoder's own `greedy` loop returns, from `step` alone: feed the tokens `feed` (a prompt, or
    the token chosen last), then choose `num_preds` tokens, each the argmax of its logits with the `never`
    tokens left out (as `choose` picks them at temperature 0) and each fed back but the last. Returns the
    tokens (n,), their logits (n, V) and the state."""
    for tok in feed[:-1]:
        _, state = step(np.array([tok]), state)
    tok, ids, rows = feed[-1], [], []
    for _ in range(num_preds):
        logits, state = step(np.array([tok]), state)
        z = np.array(logits, dtype=np.float64)[0]
        rows.append(z.copy())
        z[list(never)] = -np.inf
        tok = int(z.argmax())
        ids.append(tok)
    return np.array(ids, dtype=np.int64), np.array(rows) if rows else np.empty((0, 0)), state


def _check_rows(logits, never, first: bool) -> None:
    """The checks `choose` makes of each step's logits, for the rows of a chunk: the first step's in its
    order (non-finite scores, then a vocabulary of `never` tokens only), then every row's scores."""
    if first:
        _scores(logits[:1], never)
    if not np.isfinite(np.asarray(logits, dtype=np.float64).sum(axis=1)).all():
        raise RnnlabError(NON_FINITE)


def greedy(step, state, prompt_ids, token_text: Sequence[str], num_preds: int, stop: Sequence[str] = (),
           never=()) -> str:
    """The text `stream` makes at temperature 0 for one continuation, made in chunks of tokens by the step's
    own `greedy` loop where it has one (`greedy_steps` otherwise)."""
    return "".join(greedy_pieces(step, state, prompt_ids, token_text, num_preds, stop, never))


def greedy_pieces(step, state, prompt_ids, token_text: Sequence[str], num_preds: int, stop: Sequence[str] = (),
                  never=(), first_chunk: int = 0) -> Iterator[str]:
    """One greedy continuation's text, a piece per chunk of tokens chosen by the step's own `greedy` loop
    where it has one (`greedy_steps` otherwise): chunks of `first_chunk` tokens (default: FIRST_CHUNK with
    stop texts, else LAST_CHUNK) doubling up to LAST_CHUNK. A stop text is looked for in each chunk, token
    by token where one ends in it, and the logits are checked as `choose` checks them, up to the token that
    completes the stop text. A step's loop gives the same tokens however the continuation is cut into
    chunks, so the text does not depend on them."""
    _check(prompt_ids, 0.0)
    run = getattr(step, "greedy", None) or (lambda *args: greedy_steps(step, *args))
    stopper = Stopper(stop)
    feed, done = np.asarray(prompt_ids), 0
    chunk = first_chunk or (FIRST_CHUNK if stop else LAST_CHUNK)
    while done < num_preds:
        n = min(chunk, num_preds - done)
        ids, logits, state = run(feed, state, n, never)
        texts = [token_text[t] for t in ids.tolist()]
        used, pieces = n, []
        if not stop:
            pieces.append("".join(texts))
        elif find_stop(stopper.text + "".join(texts), stop, len(stopper.text)) < 0:
            pieces.append(stopper.feed("".join(texts)))
        else:                                          # a stop text ends in this chunk: where exactly
            for used, piece in enumerate(texts, 1):
                pieces.append(stopper.feed(piece))
                if stopper.done:
                    break
        if logits is not None:                         # None: the decoder has proved them finite
            _check_rows(logits[:used], never, first=done == 0)
        yield "".join(pieces)
        if stopper.done:
            return
        done, feed, chunk = done + n, ids[-1:], min(2 * chunk, LAST_CHUNK)
    yield stopper.flush()


# --- beam search ------------------------------------------------------------------------------------------------

class Hypothesis(NamedTuple):
    """A finished beam: its text, total log-probability (nats), length in tokens, and rank score."""
    text: str
    logprob: float
    length: int
    score: float


def _rank(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(length, 1) ** length_penalty


def beam_search(step, state, prompt_ids, token_text: Sequence[str], num_preds: int, width: int,
                num_results: int = 1, length_penalty: float = 1.0, stop: Sequence[str] = (),
                never=()) -> list[Hypothesis]:
    """The `num_results` best continuations among `width` beams, best first.

    A beam scores the sum of its tokens' log-probabilities. At each step every beam's V extensions compete
    and the best `width` survive; each survivor's hidden state is its parent's, so the states are reordered
    by parent. A beam that reaches a stop text is finished there (cut before it); decoding ends when `width`
    beams are finished or after `num_preds` tokens. Finished texts rank by logprob / length**length_penalty.
    """
    _check(prompt_ids, 0.0)
    if num_preds == 0:
        return [Hypothesis("", 0.0, 0, 0.0)] * num_results
    state = take(warm_up(step, state, prompt_ids), np.zeros(width, dtype=np.int64))
    scores = np.full(width, -np.inf)
    scores[0] = 0.0                                    # all beams start equal: expand the first only
    texts, last = [""] * width, np.full(width, prompt_ids[-1], dtype=np.int64)
    finished: list[Hypothesis] = []
    for length in range(1, num_preds + 1):
        logits, state = step(last, state)
        total = (scores[:, None] + log_softmax(logits, never)).ravel()        # (width * V,)
        order = np.argsort(-total, kind="stable")
        parents, tokens, new_texts = [], [], []
        for idx in order[: 2 * width]:                 # enough that `width` survive the finished ones
            if not np.isfinite(total[idx]) or len(parents) == width:
                break
            parent, tok = divmod(int(idx), logits.shape[1])
            text = texts[parent] + token_text[tok]
            cut = find_stop(text, stop, len(texts[parent]))
            if cut >= 0:
                finished.append(Hypothesis(text[:cut], float(total[idx]), length,
                                           _rank(float(total[idx]), length, length_penalty)))
            else:
                parents.append(parent)
                tokens.append(tok)
                new_texts.append(text)
        if len(finished) >= width or not parents:
            break
        state = take(state, np.array(parents))
        scores, texts, last = total[np.array(parents) * logits.shape[1] + tokens], new_texts, np.array(tokens)
    else:
        finished += [Hypothesis(t, float(s), num_preds, _rank(float(s), num_preds, length_penalty))
                     for t, s in zip(texts, scores) if np.isfinite(s)]
    finished.sort(key=lambda h: -h.score)
    return finished[:num_results]
