"""Samplers: the book's semantics as invariants, for many shapes (hypothesis)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnlab import samplers

shapes = st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(0, 120), st.integers(0, 2**31))


def _draw(sampler, args):
    """(corpus, batches, B, T) for one hypothesis example: a corpus of consecutive values mod 251."""
    B, T, extra, seed = args
    corpus = np.arange(samplers.min_tokens(B, T, "sequential") + extra) % 251
    return corpus, list(sampler(corpus, B, T, np.random.default_rng(seed))), B, T


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_sequential_rows_continue(args):
    corpus, batches, B, T = _draw(samplers.seq_data_iter_sequential, args)
    assert batches, "min_tokens must guarantee one minibatch"
    for X, Y in batches:
        assert X.shape == Y.shape == (B, T)
        np.testing.assert_array_equal(Y, (X + 1) % 251)            # Y is X shifted by one
    stream = np.concatenate([X for X, _ in batches], axis=1)       # row b of batch k+1 continues row b of k
    assert np.all((np.diff(stream, axis=1) % 251) == 1)
    offset = batches[0][0][0, 0]
    assert 0 <= offset <= T                                        # the book's randint(0, num_steps)
    # remainder dropped: every row holds the same count, all whole steps
    assert stream.shape[1] == ((len(corpus) - offset - 1) // B) // T * T


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_random_disjoint_and_shifted(args):
    corpus, batches, B, T = _draw(samplers.seq_data_iter_random, args)
    assert batches
    offset = int(batches[0][0].min()) % T if T > 1 else 0
    assert len(batches) == ((len(corpus) - offset - 1) // T) // B     # every whole minibatch, no more
    starts = []
    for X, Y in batches:
        assert X.shape == (B, T)
        np.testing.assert_array_equal(Y, (X + 1) % 251)
        assert np.all(np.diff(X, axis=1) % 251 == 1)              # each row is a contiguous subsequence
        starts.extend(X[:, 0].tolist())
    assert len(set(starts)) == len(starts)                        # disjoint within the epoch
    assert all((s - starts[0]) % T == 0 for s in starts)          # on one T-grid from the random offset


def test_seed_reproduces_batches_and_rng_advances_eagerly():
    corpus = np.arange(1000) % 50
    for sampling in samplers.SAMPLINGS:
        a = list(samplers.batches(corpus, 4, 6, sampling, np.random.default_rng(3)))
        b = list(samplers.batches(corpus, 4, 6, sampling, np.random.default_rng(3)))
        assert all(np.array_equal(x1, x2) and np.array_equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
        # randomness is drawn at call time, so the generator's state does not depend on consumption
        r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
        list(samplers.batches(corpus, 4, 6, sampling, r1))
        samplers.batches(corpus, 4, 6, sampling, r2)
        assert r1.bit_generator.state == r2.bit_generator.state


def test_min_tokens_is_tight():
    B, T = 3, 4
    for sampling, largest_offset in (("random", T - 1), ("sequential", T)):
        n = samplers.min_tokens(B, T, sampling)
        corpus = np.arange(n)
        # force the worst offset by trying many seeds: always at least one batch
        for seed in range(50):
            assert list(samplers.batches(corpus, B, T, sampling, np.random.default_rng(seed)))
        short = np.arange(n - 1)
        counts = {len(list(samplers.batches(short, B, T, sampling, np.random.default_rng(s)))) for s in range(200)}
        assert 0 in counts        # one token fewer: the largest offset leaves no full minibatch
        assert n == B * T + largest_offset + 1
