"""Decoding against a fake model whose answer is known (no training involved)."""
import numpy as np
import pytest

from rnnlab import generate
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
    out = generate.generate(model.step, np.zeros((1, 1)), [4, 2, 3], num_preds=5)
    assert out.tolist() == [[4, 2, 3, 4, 5, 0, 1, 2]]
    # the book's predict_ch8: every prefix token is fed once, then each generated token but the last
    assert [int(t[0]) for t in model.fed] == [4, 2, 3, 4, 5, 0, 1]


def test_state_is_threaded_through_every_step():
    seen = []

    def step(token_ids, state):
        seen.append(state.copy())
        return np.eye(V)[np.asarray(token_ids)], state + 1

    generate.generate(step, np.zeros((1, 2)), [1, 1], num_preds=3)
    assert [int(s[0, 0]) for s in seen] == [0, 1, 2, 3]


def test_sampling_distribution_and_seed():
    # logits with known probabilities: softmax([log .7, log .2, log .1]) = [.7, .2, .1]
    probs = np.array([0.7, 0.2, 0.1])
    logits = np.tile(np.log(probs), (20000, 1))
    picks = generate.pick(logits, 1.0, np.random.default_rng(0))
    freq = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    # temperature sharpens: T=0.5 squares the probabilities (renormalised)
    sharp = np.bincount(generate.pick(logits, 0.5, np.random.default_rng(1)), minlength=3) / len(picks)
    np.testing.assert_allclose(sharp, probs**2 / (probs**2).sum(), atol=0.015)
    a = generate.pick(logits[:50], 1.0, np.random.default_rng(7))
    b = generate.pick(logits[:50], 1.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_temperature_zero_is_argmax_and_batched_rows_are_independent():
    model = FakeModel()
    out = generate.generate(model.step, np.zeros((1, 4)), [0], num_preds=3, temperature=0.0)
    assert out.tolist() == [[0, 1, 2, 3]] * 4
    sampled = generate.generate(FakeModel().step, np.zeros((1, 64)), [0], 8, temperature=5.0,
                                rng=np.random.default_rng(0))
    assert len({tuple(r) for r in sampled.tolist()}) > 1      # hot sampling: rows differ


def test_bad_prefix_and_temperature():
    with pytest.raises(RnnlabError, match="empty"):
        generate.generate(FakeModel().step, np.zeros((1, 1)), [], 3)
    with pytest.raises(RnnlabError, match="temperature"):
        generate.generate(FakeModel().step, np.zeros((1, 1)), [1], 3, temperature=-1)


def test_predict_maps_unknown_characters_to_unk():
    from rnnlab.text import Vocab
    vocab = Vocab("abcde")              # 6 tokens with <unk>, like V
    model = FakeModel()
    model.begin_state = lambda b: np.zeros((1, b))
    model.decoder = lambda: model.step
    text = generate.predict(model, vocab, "a?", num_preds=2)[0]
    assert text.startswith("a<unk>") and len(vocab) == V


def test_never_sample_masks_a_token_when_sampling_and_when_greedy():
    def step(token_ids, state):
        logits = np.zeros((len(token_ids), V))
        logits[:, 0] = 3.0                     # token 0 (<unk>) is the most likely
        return logits, state

    sampled = generate.generate(step, np.zeros((1, 32)), [1], 20, temperature=1.0, rng=np.random.default_rng(0),
                                never_sample=[0])
    assert (sampled[:, 1:] != 0).all()
    greedy = generate.generate(step, np.zeros((1, 1)), [1], 3, never_sample=[0])
    assert greedy.tolist() == [[1, 1, 1, 1]]   # the argmax over the tokens that may be emitted (first of ties)
