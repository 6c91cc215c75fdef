"""The numpy backend's decoder and the fast decoding paths: the decoder computes what the generic step
(`network.forward` with T=1) computes, for every cell, depth, input kind and variant; its greedy loop gives
bit for bit what its batch-1 steps give; and the texts of `decoding.greedy` and `decoding.continuations`
are exactly those `decoding.stream` makes, with <unk> masked, stop texts, and diverged models."""
import itertools

import numpy as np
import pytest
from helpers import random_params, random_state, rel_err

from rnnlab import decoding
from rnnlab.backends.numpy_backend import NumpyBackend
from rnnlab.config import DataConfig, ModelConfig
from rnnlab.errors import RnnlabError
from rnnlab.lm import LM
from rnnlab.text import Vocab

V, H = 11, 9
TEXT = [f"{chr(97 + i)}" for i in range(V)]
NETWORKS = [dict(cell=cell, num_layers=layers, embed_size=embed, cell_variant=variant)
            for cell, layers, embed, variant in itertools.product(("rnn", "gru", "lstm"), (1, 2), (0, 4),
                                                                  ("book", "nn"))]
NAMES = ["{cell}-{num_layers}-E{embed_size}-{cell_variant}".format(**n) for n in NETWORKS]


def backend(arch, dtype=np.float64, scale=0.6, seed=0, activation="tanh"):
    return NumpyBackend(random_params(V, H, dtype, scale=scale, seed=seed, **arch), activation)


# --- the decoder against the generic step ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("arch", NETWORKS, ids=NAMES)
def test_the_decoder_computes_the_generic_step(arch, dtype, tol):
    b = backend(arch, dtype)
    rng = np.random.default_rng(1)
    for B in (1, 4):
        step = b.decoder()
        ref = new = random_state(b.arch.num_state_slices, B, H, dtype, scale=0.4)
        for t in range(8):
            tokens = rng.integers(0, V, B)
            if t == 5:                                   # a state the decoder did not make: reordered rows
                rows = rng.integers(0, B, B)
                ref, new = ref[:, rows], new[:, rows]
            if t == 6:                                   # and a copy of the one it made
                new = new.copy()
            l1, ref = b.step(tokens, ref)
            l2, new = step(tokens, new)
            assert l2.dtype == dtype and new.dtype == dtype and new.shape == ref.shape
            assert rel_err(l1, l2) < tol and rel_err(ref, new) < tol, (B, t)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_the_decoder_applies_the_activation_and_follows_updates(activation):
    b = backend(dict(cell="rnn", num_layers=2), activation=activation)
    state = random_state(2, 3, H)
    tokens = np.array([1, 4, 7])
    assert rel_err(b.step(tokens, state)[0], b.decoder()(tokens, state)[0]) < 1e-12
    b.update(lambda params: {k: v * 1.5 for k, v in params.items()})    # new weights: a new decoder sees them
    assert rel_err(b.step(tokens, state)[0], b.decoder()(tokens, state)[0]) < 1e-12


def test_steps_return_fresh_arrays():
    b = backend(dict(cell="lstm", num_layers=2))
    step, state = b.decoder(), b.begin_state(1)
    logits, first = step(np.array([1]), state)
    kept = logits.copy(), first.copy()
    step(np.array([2]), first)
    step.greedy(np.array([3, 4]), first, 5)
    np.testing.assert_array_equal(kept[0], logits)
    np.testing.assert_array_equal(kept[1], first)


# --- the greedy loop: the decoder's own batch-1 steps, bit for bit --------------------------------------------

@pytest.mark.parametrize("start", ["zeros", "large"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("arch", NETWORKS[::3] + [dict(cell="rnn"), dict(cell="rnn", embed_size=4), "relu"],
                         ids=NAMES[::3] + ["book", "rnn-E4", "relu"])
def test_the_greedy_loop_is_the_decoders_batch1_steps(arch, dtype, start):
    b = backend(dict(cell="rnn"), dtype, scale=1.0, activation="relu") if arch == "relu" else \
        backend(arch, dtype, scale=1.0)
    never = (0, 3)
    feed = np.array([2, 5, 1])
    begin = b.begin_state(1) if start == "zeros" else random_state(b.arch.num_state_slices, 1, H, dtype, scale=3)
    ids, logits, state = b.decoder().greedy(feed, begin, 40, never)
    step, ref_state = b.decoder(), begin
    for tok in feed[:-1]:
        _, ref_state = step(np.array([tok]), ref_state)
    tok, ref_ids, ref_logits = feed[-1], [], []
    for _ in range(40):
        row, ref_state = step(np.array([tok]), ref_state)
        ref_logits.append(row[0])
        z = row[0].astype(np.float64)
        z[list(never)] = -np.inf
        tok = int(z.argmax())
        ref_ids.append(tok)
    assert ids.tolist() == ref_ids and not set(ids.tolist()) & set(never)
    if logits is None:                # left unchecked only where they cannot be infinite: a bounded tanh RNN
        assert b.arch.cell == "rnn" and arch != "relu" and start == "zeros" and np.isfinite(ref_logits).all()
    else:
        np.testing.assert_array_equal(logits, np.array(ref_logits))
    np.testing.assert_array_equal(state, ref_state)
    # the generic loop over any step gives the same
    g_ids, g_logits, g_state = decoding.greedy_steps(b.decoder(), feed, begin, 40, never)
    assert g_ids.tolist() == ref_ids
    np.testing.assert_array_equal(g_logits, np.array(ref_logits))
    np.testing.assert_array_equal(g_state, state)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_model_whose_logits_overflow_is_refused_on_every_path(dtype):
    big = np.finfo(dtype).max / 4
    for scale in (1.0, big / 100, big):
        b = backend(dict(cell="rnn"), dtype, scale=1.0)
        b.update(lambda params: {**params, "W_hq": params["W_hq"] * scale})
        outcomes = []
        for fn in (lambda: streamed(b.decoder(), b.begin_state(1), [1, 2], 30)[0],
                   lambda: decoding.greedy(b.decoder(), b.begin_state(1), [1, 2], TEXT, 30),
                   lambda: streamed(b.step, b.begin_state(1), [1, 2], 30)[0]):
            try:
                outcomes.append(fn())
            except RnnlabError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1] == outcomes[2], scale
        assert ("non-finite" in outcomes[0]) == (scale == big)


def test_the_greedy_loop_continues_where_it_stopped():
    b = backend(dict(cell="rnn"), np.float32, scale=1.0)
    whole, _, end = b.decoder().greedy(np.array([1, 2]), b.begin_state(1), 30)
    step = b.decoder()
    first, _, state = step.greedy(np.array([1, 2]), b.begin_state(1), 12)
    rest, _, state = step.greedy(first[-1:], state, 18)
    assert np.concatenate([first, rest]).tolist() == whole.tolist()
    np.testing.assert_array_equal(state, end)
    none, logits, same = step.greedy(np.array([4]), state, 0)
    assert none.shape == (0,) and (logits is None or logits.shape == (0, V)) and same is state


# --- texts: the fast paths make exactly the text `stream` makes -----------------------------------------------

def streamed(step, state, prompt, num_preds, **options):
    n = options.get("num_samples", 1)
    parts = [[] for _ in range(n)]
    for piece in decoding.stream(step, state, prompt, TEXT, num_preds, **options):
        parts[piece.sample].append(piece.text)
    return ["".join(p) for p in parts]


CASES = [dict(), dict(never=(0,)), dict(never=(0, 2), stop=("ab", "c")), dict(stop=("bcd", "d", "zz")),
         dict(stop=("abcd", "c")), dict(never=(1,), stop=("e",))]


@pytest.mark.parametrize("num_preds", [0, 1, 50, 300])
@pytest.mark.parametrize("arch", [dict(cell="rnn"), dict(cell="gru", num_layers=2, embed_size=4),
                                  dict(cell="lstm", cell_variant="nn")], ids=["book", "gru2", "lstm-nn"])
def test_fast_greedy_text_is_the_streamed_text(arch, num_preds):
    for seed, dtype, case in itertools.product((0, 1, 2), (np.float32, np.float64), CASES):
        b = backend(arch, dtype, scale=1.2, seed=seed)
        prompt = np.array([3, 1, 4, 1, 5])
        want = streamed(b.decoder(), b.begin_state(1), prompt, num_preds, **case)[0]
        got = decoding.greedy(b.decoder(), b.begin_state(1), prompt, TEXT, num_preds, case.get("stop", ()),
                              case.get("never", ()))
        assert got == want, (seed, dtype, case)
        generic = decoding.greedy(b.step, b.begin_state(1), prompt, TEXT, num_preds, case.get("stop", ()),
                                  case.get("never", ()))
        assert generic == streamed(b.step, b.begin_state(1), prompt, num_preds, **case)[0]


def test_a_stop_text_is_cut_where_the_stream_cuts_it_whatever_the_chunks():
    def step(token_ids, state):                      # writes "abcd" over and over
        logits = np.zeros((len(token_ids), 4))
        logits[np.arange(len(token_ids)), (np.asarray(token_ids) + 1) % 4] = 1.0
        return logits, state
    for stop in [("abcd", "c"), ("da",), ("cdab", "dabc", "b"), ("x",), ("d" + "abcd" * 20,)]:
        for num_preds in (1, 3, 31, 32, 33, 95, 200):
            want = streamed(step, np.zeros((1, 1)), [3], num_preds, stop=stop)[0][:]
            got = decoding.greedy(step, np.zeros((1, 1)), [3], list("abcd"), num_preds, stop)
            assert got == want, (stop, num_preds)


def test_greedy_refuses_what_the_stream_refuses():
    def diverging(at, row=0):
        def step(token_ids, state):
            logits = np.zeros((len(token_ids), 4))
            logits[:, 1] = 1.0
            if state[0, 0, 0] == at:
                logits[:, row] = np.nan
            return logits, state + 1
        return step
    for at in (0, 5, 40, 70):                          # in the first chunk, a later one, or past the end
        for stop in ((), ("bbbbbbbbbbbb",)):            # the stop text ends at the 12th token
            def outcome(fn):
                try:
                    return fn()
                except RnnlabError as e:
                    return str(e)
            want = outcome(lambda: streamed(diverging(at), np.zeros((1, 1, 1)), [1], 60, stop=stop)[0])
            got = outcome(lambda: decoding.greedy(diverging(at), np.zeros((1, 1, 1)), [1], list("abcd"), 60, stop))
            assert got == want, (at, stop)
            if at == 40 and stop:
                assert got == ""                       # cut before the stop text; the scores after it unread
    with pytest.raises(RnnlabError, match="never emitted"):
        decoding.greedy(diverging(99), np.zeros((1, 1, 1)), [1], list("abcd"), 5, never=(0, 1, 2, 3))
    with pytest.raises(RnnlabError, match="non-finite"):      # the first step's scores are checked first
        decoding.greedy(diverging(0), np.zeros((1, 1, 1)), [1], list("abcd"), 5, never=(0, 1, 2, 3))


@pytest.mark.parametrize("options", [
    dict(temperature=0.0, num_samples=3), dict(temperature=1.0, num_samples=5),
    dict(temperature=0.7, top_k=3, top_p=0.8, num_samples=4, seed=3), dict(temperature=2.0, num_samples=1),
    dict(temperature=1.0, num_samples=6, stop=("a", "bc"), never=(0,)), dict(temperature=1e-30, num_samples=2)])
def test_continuations_are_the_streamed_texts(options):
    b = backend(dict(cell="lstm", num_layers=2, embed_size=4), np.float32, scale=0.8)
    for num_preds in (0, 7, 300):                     # 300: more steps than one block of draws
        want = streamed(b.decoder(), b.begin_state(1), [2, 7], num_preds, **options)
        got = decoding.continuations(b.decoder(), b.begin_state(1), [2, 7], TEXT, num_preds, **options)
        assert got == want


def test_draws_by_block_are_a_draw_per_step():
    draws = decoding.Uniforms(4, 3, 600)
    rngs = [np.random.default_rng([4, i]) for i in range(3)]
    for step in range(600):
        rows = np.arange(3) if step < 300 else np.array([0, 2])
        np.testing.assert_array_equal(draws.next(rows), [rngs[r].random() for r in rows])


def test_lm_generate_greedy_is_its_stream():
    chars = "abcdefghij"
    b = NumpyBackend(random_params(len(chars) + 1, 12, np.float32, scale=1.5, seed=4))
    lm = LM(b, Vocab(chars), DataConfig(preprocess="raw"), ModelConfig())
    for options in (dict(temperature=0.0), dict(temperature=0.0, stop=("ab", "j")),
                    dict(temperature=0.9, num_samples=3), dict(temperature=0.0, num_samples=2)):
        cfg = lm.options(num_preds=120, **options)
        parts = [["cab"] for _ in range(cfg.num_samples)]
        for piece in lm.stream("cab", cfg):
            parts[piece.sample].append(piece.text)
        assert lm.generate("cab", cfg) == ["".join(p) for p in parts]
        assert all("<unk>" not in t for t in lm.generate("cab", cfg))
