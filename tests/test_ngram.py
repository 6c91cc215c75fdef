"""The Kneser–Ney baseline: a proper distribution, the formula by hand, and the CLI's split."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnlab import ngram
from rnnlab.errors import RnnlabError


def next_token_distribution(model, context):
    """P(w | context) for every w in the vocabulary."""
    return np.array([model.probs(np.array([*context, w]))[-1] for w in range(model.V)])


@settings(max_examples=40, deadline=None)
@given(corpus=st.lists(st.integers(0, 4), min_size=6, max_size=80), order=st.integers(1, 4),
       context=st.lists(st.integers(0, 5), min_size=1, max_size=4))
def test_every_context_gets_a_proper_distribution(corpus, order, context):
    V = 6                                   # token 5 never occurs in training: only the floor covers it
    model = ngram.KneserNey(order, V).fit(np.array(corpus))
    p = next_token_distribution(model, context)
    assert (p > 0).all()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_bigram_by_hand():
    # training "a b a b a c" over V = 3 (a=0, b=1, c=2)
    model = ngram.KneserNey(2, 3).fit(np.array([0, 1, 0, 1, 0, 2]))
    # bigram counts: ab 2, ba 2, ac 1 -> n1 = 1, n2 = 2, D2 = 1 / 5
    # continuation counts (distinct left neighbours): a <- {b} 1, b <- {a} 1, c <- {a} 1 -> all ones:
    # n1 = 3, n2 = 0, D1 = 1; P1(w) = (0 + 1 * 3 * 1/3) / 3 = 1/3 for each w
    D2 = 1 / 5
    # context a: c(a .) = 3 (ab 2, ac 1), N1+(a .) = 2
    p_b_after_a = (2 - D2 + D2 * 2 * (1 / 3)) / 3
    p_a_after_a = (0 + D2 * 2 * (1 / 3)) / 3
    got = model.probs(np.array([0, 1, 0, 0]))
    assert got[0] == pytest.approx(p_b_after_a)          # b after a
    assert got[2] == pytest.approx(p_a_after_a)          # a after a
    # context b: c(b .) = 2 (ba 2), N1+(b .) = 1
    assert got[1] == pytest.approx((2 - D2 + D2 * 1 / 3) / 2)


def test_unseen_context_backs_off_to_the_lower_order():
    model = ngram.KneserNey(3, 4).fit(np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    lower = ngram.KneserNey(2, 4).fit(np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    # context (3, 3) never occurs, so the trigram model's P(. | 3 3) is its bigram level's P(. | 3)
    tri = next_token_distribution(model, [3, 3])
    assert tri.sum() == pytest.approx(1.0)
    assert np.argmax(next_token_distribution(model, [0, 1])) == 2
    assert np.argmax(next_token_distribution(lower, [1])) == 2


def test_higher_orders_fit_repetitive_text_better():
    text = np.tile(np.array([0, 1, 2, 3, 2, 1]), 50)
    ppl = [ngram.KneserNey(n, 4).fit(text).score(text[:60])["perplexity"] for n in (1, 2, 3)]
    assert ppl[0] > ppl[1] > ppl[2]
    assert ppl[2] < 1.2


def test_bad_orders_are_one_clear_error():
    with pytest.raises(RnnlabError, match="--order must be >= 1"):
        ngram.KneserNey(0, 5)
    with pytest.raises(RnnlabError, match="too large"):
        ngram.KneserNey(8, 5000)
    with pytest.raises(RnnlabError, match="too few"):
        ngram.KneserNey(5, 3).fit(np.array([0, 1]))
