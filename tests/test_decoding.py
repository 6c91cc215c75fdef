"""Decoding against fake models whose distributions are known (no training involved): greedy, sampling with
temperature / top-k / top-p, batches of continuations, stop texts, streaming and beam search."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rnnlab import decoding
from rnnlab.errors import RnnlabError

V = 6


class FakeModel:
    """Logits favour (last token + 1) mod V; the state counts the tokens fed, to check the warm-up."""

    def __init__(self):
        self.fed = []

    def step(self, token_ids, state):
        self.fed.append(np.asarray(token_ids).copy())
        logits = np.full((len(token_ids), V), -5.0)
        logits[np.arange(len(token_ids)), (np.asarray(token_ids) + 1) % V] = 5.0
        return logits, state + 1


def test_greedy_follows_the_argmax_and_warms_up_on_the_prefix():
    model = FakeModel()
    out = decoding.generate(model.step, np.zeros((1, 1)), [4, 2, 3], num_preds=5)
    assert out.tolist() == [[4, 2, 3, 4, 5, 0, 1, 2]]
    # the book's predict_ch8: every prefix token is fed once, then each generated token but the last
    assert [int(t[0]) for t in model.fed] == [4, 2, 3, 4, 5, 0, 1]


def test_state_is_threaded_through_every_step():
    seen = []

    def step(token_ids, state):
        seen.append(state.copy())
        return np.eye(V)[np.asarray(token_ids)], state + 1

    decoding.generate(step, np.zeros((1, 2)), [1, 1], num_preds=3)
    assert [int(s[0, 0]) for s in seen] == [0, 1, 2, 3]


def test_sampling_distribution_and_seed():
    # logits with known probabilities: softmax([log .7, log .2, log .1]) = [.7, .2, .1]
    probs = np.array([0.7, 0.2, 0.1])
    logits = np.tile(np.log(probs), (20000, 1))
    picks = decoding.pick(logits, 1.0, np.random.default_rng(0))
    freq = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    # temperature sharpens: T=0.5 squares the probabilities (renormalised)
    sharp = np.bincount(decoding.pick(logits, 0.5, np.random.default_rng(1)), minlength=3) / len(picks)
    np.testing.assert_allclose(sharp, probs**2 / (probs**2).sum(), atol=0.015)
    a = decoding.pick(logits[:50], 1.0, np.random.default_rng(7))
    b = decoding.pick(logits[:50], 1.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_temperature_zero_is_argmax_and_batched_rows_are_independent():
    model = FakeModel()
    out = decoding.generate(model.step, np.zeros((1, 4)), [0], num_preds=3, temperature=0.0)
    assert out.tolist() == [[0, 1, 2, 3]] * 4
    sampled = decoding.generate(FakeModel().step, np.zeros((1, 64)), [0], 8, temperature=5.0,
                                rng=np.random.default_rng(0))
    assert len({tuple(r) for r in sampled.tolist()}) > 1      # hot sampling: rows differ


def test_bad_prefix_and_temperature():
    with pytest.raises(RnnlabError, match="empty"):
        decoding.generate(FakeModel().step, np.zeros((1, 1)), [], 3)
    with pytest.raises(RnnlabError, match="temperature"):
        decoding.generate(FakeModel().step, np.zeros((1, 1)), [1], 3, temperature=-1)


def test_never_sample_masks_a_token_when_sampling_and_when_greedy():
    def step(token_ids, state):
        logits = np.zeros((len(token_ids), V))
        logits[:, 0] = 3.0                     # token 0 (<unk>) is the most likely
        return logits, state

    sampled = decoding.generate(step, np.zeros((1, 32)), [1], 20, temperature=1.0, rng=np.random.default_rng(0),
                                never_sample=[0])
    assert (sampled[:, 1:] != 0).all()
    greedy = decoding.generate(step, np.zeros((1, 1)), [1], 3, never_sample=[0])
    assert greedy.tolist() == [[1, 1, 1, 1]]   # the argmax over the tokens that may be emitted (first of ties)


# --- truncation and sampling against the known distribution ------------------------------------------------

def fixed(probs):
    """A step whose next-token distribution is `probs` whatever the input; the state counts the steps."""
    logits = np.log(np.asarray(probs, dtype=np.float64))

    def step(token_ids, state):
        return np.tile(logits, (len(token_ids), 1)), state + 1
    return step


def test_truncate_keeps_exactly_k_and_the_smallest_nucleus():
    z = np.log(np.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda out: np.flatnonzero(np.isfinite(out[0])).tolist()    # noqa: E731
    assert kept(decoding.truncate(z, top_k=2)) == [1, 3]
    assert kept(decoding.truncate(z, top_p=0.75)) == [1, 3]             # .5 + .3 reaches .75
    assert kept(decoding.truncate(z, top_p=0.79)) == [1, 3]
    assert kept(decoding.truncate(z, top_p=0.81)) == [1, 2, 3]
    assert kept(decoding.truncate(z, top_p=1e-9)) == [1]               # the most likely always stays
    assert kept(decoding.truncate(z, top_k=3, top_p=0.6)) == [1, 3]     # p applies to the renormalised top 3
    ties = np.zeros((1, 5))
    assert kept(decoding.truncate(ties, top_k=2)) == [0, 1]             # ties broken by token id


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}    # chi-square quantiles at 0.999 by degrees of freedom


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7),
                                                       (0.7, 4, 0.9), (2.0, 2, 1.0)])
def test_sampling_frequencies_follow_the_truncated_distribution(temperature, top_k, top_p):
    """20,000 continuations of one step against the distribution computed by hand: tokens outside the
    truncation never appear, and the others pass a chi-square test (fixed seed: the same draws every run)."""
    probs = np.array([0.02, 0.33, 0.25, 0.2, 0.12, 0.08])      # token 0 is <unk>, never emitted
    expected = np.where(np.arange(6) == 0, 0.0, probs ** (1 / temperature))
    order = np.argsort(-expected, kind="stable")
    allowed = np.zeros(6, bool)
    allowed[order[: top_k or 5]] = True
    q = np.where(allowed, expected, 0) / np.where(allowed, expected, 0).sum()
    before = np.cumsum(q[order]) - q[order]
    allowed[order[before >= top_p]] = False
    expected = np.where(allowed, expected, 0) / np.where(allowed, expected, 0).sum()

    n = 20_000
    pieces = list(decoding.stream(fixed(probs), np.zeros((1, 1)), [1], list("uabcde"), 1, temperature, top_k,
                                  top_p, num_samples=n, seed=5, never=[0]))
    counts = np.bincount(["uabcde".index(p.text) for p in pieces], minlength=6)
    assert counts.sum() == n and (counts[~allowed] == 0).all()
    observed, wanted = counts[allowed], n * expected[allowed]
    chi2 = ((observed - wanted) ** 2 / wanted).sum()
    assert allowed.sum() == 1 or chi2 < CHI2_999[allowed.sum() - 1]


def test_each_continuation_has_its_own_random_stream():
    """Continuation i of a seed is the same text in a batch of 3 and in a batch of 8; seeds differ."""
    step = fixed([0.0001, 0.3, 0.3, 0.2, 0.1, 0.0999])

    def texts(n, seed):
        out = [""] * n
        for p in decoding.stream(step, np.zeros((1, 1)), [1, 2], list("uabcde"), 40, 1.0, num_samples=n,
                                 seed=seed, never=[0]):
            out[p.sample] += p.text
        return out

    eight = texts(8, seed=3)
    assert texts(3, seed=3) == eight[:3] and len(set(eight)) == 8
    assert texts(8, seed=4) != eight


def test_the_prompt_is_read_once_and_its_state_shared_by_every_row():
    model = FakeModel()
    pieces = list(decoding.stream(model.step, np.zeros((1, 1)), [4, 2, 3], list("uabcde"), 3, num_samples=5))
    fed = [t.tolist() for t in model.fed]
    assert fed[:2] == [[4], [2]] and fed[2] == [3] * 5           # warm-up at batch 1, then 5 rows
    assert "".join(p.text for p in pieces if p.sample == 0) == "deu"      # greedy: ids 3 -> 4 -> 5 -> 0
    assert len(pieces) == 15


# --- stop texts and streaming -------------------------------------------------------------------------------

def cycle(text):
    """A greedy model that writes `text` over and over, one character per step (vocab: the text's chars)."""
    chars = sorted(set(text))
    nxt = {chars.index(a): chars.index(b) for a, b in zip(text, text[1:] + text[0])}

    def step(token_ids, state):
        logits = np.zeros((len(token_ids), len(chars)))
        logits[np.arange(len(token_ids)), [nxt[int(t)] for t in token_ids]] = 10.0
        return logits, state
    return step, chars


def test_a_stop_text_straddling_tokens_is_cut_and_never_streamed():
    step, chars = cycle("dark. howl")
    pieces = list(decoding.stream(step, np.zeros((1, 1)), [chars.index("d")], chars, 100, stop=["k. ho"]))
    assert "".join(p.text for p in pieces) == "ar"                # cut before the stop text, across 5 tokens
    assert all("k" not in p.text for p in pieces)


def test_stop_texts_with_word_tokens_and_the_earliest_of_several():
    words = ["<unk>", "alpha", "beta", "gamma"]
    nxt = {1: 2, 2: 3, 3: 1}

    def step(token_ids, state):
        logits = np.zeros((len(token_ids), 4))
        logits[np.arange(len(token_ids)), [nxt[int(t)] for t in token_ids]] = 5.0
        return logits, state
    token_text = [" " + w for w in words]
    text = "".join(p.text for p in decoding.stream(step, np.zeros((1, 1)), [1], token_text, 20,
                                                   stop=["a gam", "mma alpha"]))
    assert text == " bet"                                        # "a gam" straddles " beta" and " gamma"


def test_rows_that_stop_leave_the_batch():
    sizes = []
    probs = np.array([0.0, 0.5, 0.5])

    def step(token_ids, state):
        sizes.append(len(token_ids))
        return np.tile(np.log(probs + 1e-300), (len(token_ids), 1)), state

    out = [""] * 16
    for p in decoding.stream(step, np.zeros((1, 1)), [1], ["?", "a", "b"], 30, 1.0, num_samples=16,
                             stop=["b"], seed=0, never=[0]):
        out[p.sample] += p.text
    assert all(set(t) <= {"a"} and len(t) < 30 for t in out)     # every row met a "b" and stopped before it
    assert sizes[0] == 16 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 16


@given(text=st.text("abc", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text("abc", min_size=1, max_size=4), max_size=3))
def test_stopper_streams_exactly_the_text_before_the_first_stop(text, cuts, stops):
    """Whatever the pieces, what is released is the text cut before the first stop text to be complete, and
    nothing of a stop text is ever released."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    stopper, out = decoding.Stopper(stops), ""
    for a, b in zip(bounds, bounds[1:]):
        out += stopper.feed(text[a:b])
        if stopper.done:
            break
    out += stopper.flush()
    assert out == first_stop_one_character_at_a_time(text, stops)


def first_stop_one_character_at_a_time(text: str, stops) -> str:
    """The text as a continuation written one character at a time ends: at the first character that
    completes a stop text, cut before the longest stop text completed there."""
    for end in range(1, len(text) + 1):
        done = [len(s) for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(done)]
    return text


# --- beam search --------------------------------------------------------------------------------------------

def test_beam_search_finds_what_greedy_misses():
    """After 's': 'a' (0.6) then three equal choices, or 'b' (0.4) then 'x' for certain. Greedy takes 'a' and
    ends at 0.6 / 3 = 0.2; the best two-token text is 'bx' at 0.4, which a beam of 2 finds."""
    chars = ["<unk>", "s", "a", "b", "x", "y", "z"]
    table = np.full((7, 7), 1e-12)
    table[1, [2, 3]] = [0.6, 0.4]
    table[2, [4, 5, 6]] = 1 / 3
    table[3, 4] = 1.0
    table[4:, 4:] = 1 / 3

    def step(token_ids, state):
        return np.log(table[np.asarray(token_ids)]), state

    greedy = "".join(p.text for p in decoding.stream(step, np.zeros((1, 1)), [1], chars, 2))
    assert greedy == "ax"
    best = decoding.beam_search(step, np.zeros((1, 1)), [1], chars, 2, width=2, num_results=2)
    assert [h.text for h in best] == ["bx", "ax"]
    np.testing.assert_allclose([np.exp(h.logprob) for h in best], [0.4, 0.2], rtol=1e-9)


def history_model(V=4, seed=0):
    """A model whose next-token distribution depends on the previous two tokens: the previous one lives in the
    state (S=1, B, 1), so a beam that kept another beam's state would score its text wrongly."""
    table = np.random.default_rng(seed).standard_normal((V, V, V)) * 2

    def step(token_ids, state):
        prev = state[0, :, 0].astype(int)
        return table[prev, np.asarray(token_ids)], np.asarray(token_ids, dtype=float)[None, :, None]
    return step


def true_logprob(step, prompt, tokens):
    state = np.zeros((1, 1, 1))
    for t in prompt[:-1]:
        _, state = step(np.array([t]), state)
    total, last = 0.0, prompt[-1]
    for t in tokens:
        logits, state = step(np.array([last]), state)
        total += decoding.log_softmax(logits, [0])[0, t]
        last = t
    return total


def test_beam_states_follow_their_parents_and_a_full_beam_is_exhaustive():
    import itertools
    step, chars = history_model(), ["<unk>", "a", "b", "c"]
    prompt, length = [1, 2], 4
    brute = max(itertools.product([1, 2, 3], repeat=length), key=lambda seq: true_logprob(step, prompt, seq))
    full = decoding.beam_search(step, np.zeros((1, 1, 1)), prompt, chars, length, width=81, never=[0])
    assert full[0].text == "".join(chars[t] for t in brute)
    for h in decoding.beam_search(step, np.zeros((1, 1, 1)), prompt, chars, length, width=3, num_results=3,
                                  never=[0]):
        seq = [chars.index(c) for c in h.text]
        assert h.logprob == pytest.approx(true_logprob(step, prompt, seq), rel=1e-12)


def test_beam_stop_texts_and_length_normalisation():
    """'s' -> 'e' (stop, 0.5) or 'a' (0.5) then 'a' for certain. With the stop text 'e', one beam finishes at
    length 1 with log 0.5; the other runs on at log 0.5 over more tokens. Normalised by length, the long one
    wins; unnormalised they tie and the shorter, found first, stays first."""
    chars = ["<unk>", "s", "e", "a"]
    table = np.full((4, 4), 1e-30)
    table[1, [2, 3]] = 0.5
    table[3, 3] = 1.0
    table[2, 2] = 1.0

    def step(token_ids, state):
        return np.log(table[np.asarray(token_ids)]), state

    normed = decoding.beam_search(step, np.zeros((1, 1)), [1], chars, 4, 2, 2, length_penalty=1.0, stop=["e"])
    assert [h.text for h in normed] == ["aaaa", ""]
    raw = decoding.beam_search(step, np.zeros((1, 1)), [1], chars, 4, 2, 2, length_penalty=0.0, stop=["e"])
    assert [h.text for h in raw] == ["", "aaaa"]
