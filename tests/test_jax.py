"""The jax backend against the numpy reference: same weights, same batches, same numbers.

float64: losses, states, gradients and whole epochs of training agree to ~1e-10 relative; float32 to ~1e-5
and stays float32. Clipping and the optimizers are the shared optim code on jax arrays, and optax computes
the same updates. Checkpoints move between jax and the other backends, a jax run resumes bit for bit, and the
command line trains with --backend jax. Compiling costs ~1 s per network and shape on the CPU: the tests
share a few small shapes.
"""
import dataclasses
import importlib.util
import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from conftest import DATA
from helpers import (ARCHS, assert_dynamic_evaluation_agrees, assert_resume_is_bit_exact, random_batch,
                     random_params, random_state, rel_err)

from rnnlab import backends, cells, checkpoint, cli, evaluate, decoding, network, optim, train
from rnnlab.backends import check_device, make_backend, resolve_device
from rnnlab.backends.jax_backend import JaxBackend, jax_has_gpu
from rnnlab.backends.numpy_backend import NumpyBackend
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError

TOL = {np.float64: 1e-10, np.float32: 1e-5}
BOOK = [pytest.param(None, a, onehot, id=f"book-{a}{'-onehot' if onehot else ''}")
        for a in ("tanh", "relu") for onehot in (False, True)]
FLOAT32_FAST = {"book-tanh", "lstm-2layer-embed"}     # float32 for the others: -m slow


def needs_corpus():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


def parity_cases():
    cases = BOOK + [pytest.param(arch, "tanh", False, id=arch) for arch in ARCHS]
    out = []
    for dtype in (np.float64, np.float32):
        for c in cases:
            slow = dtype == np.float32 and c.id not in FLOAT32_FAST
            out.append(pytest.param(*c.values, dtype, id=f"{c.id}-{dtype.__name__}",
                                    marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("arch, activation, onehot, dtype", parity_cases())
def test_loss_state_and_grads_agree_with_numpy(arch, activation, onehot, dtype):
    """Every cell, depth, input kind and the nn variant, with dropout masks and a carried state."""
    V, H, B, T = 9, 6, 3, 5
    params = random_params(V, H, dtype, scale=0.4, **(ARCHS[arch] if arch else {}))
    ref, fast = NumpyBackend(params, activation, onehot), JaxBackend(params, activation, onehot_input=onehot)
    a = ref.arch
    X, Y = random_batch(V, B, T)
    state = random_state(a.num_state_slices, B, H, dtype, scale=0.3)
    masks = network.dropout_masks(np.random.default_rng(4), 0.3, a.num_layers, B, T, H, dtype)
    l1, g1, s1 = ref.loss_and_grads(X, Y, state, masks)
    l2, g2, s2 = fast.loss_and_grads(X, Y, state, masks)
    tol = TOL[dtype]
    assert l1 == pytest.approx(l2, rel=tol)
    assert isinstance(s2, jax.Array) and s2.dtype == dtype and rel_err(s1, s2) < tol
    assert set(g2) == set(params)
    for name in params:
        assert isinstance(g2[name], jax.Array) and g2[name].dtype == dtype, name
        assert rel_err(g1[name], g2[name]) < tol, name


def test_float32_runs_stay_float32():
    """Nothing upcasts a float32 run: state, gradients, clipped gradients, every optimizer's parameters and
    buffers, and a checkpoint's arrays; scores come back in float64 like the reference's."""
    V, H, B, T = 9, 6, 3, 5
    f32 = np.float32
    fast = JaxBackend(random_params(V, H, f32, scale=0.4))
    X, Y = random_batch(V, B, T)
    masks = network.dropout_masks(np.random.default_rng(4), 0.3, 1, B, T, H, f32)
    state = fast.begin_state(B)
    assert state.dtype == f32 and state.shape == (1, B, H)
    for name in ("sgd", "momentum", "adam", "adamw"):
        opt = optim.make_optimizer(name, weight_decay=0.1)
        for _ in range(2):
            _, grads, state = fast.loss_and_grads(X, Y, state, masks)
            assert state.dtype == f32 and all(g.dtype == f32 for g in grads.values())
            grads, _, clipped = optim.clip(grads, 0.01)
            assert clipped and all(g.dtype == f32 for g in grads.values())
            fast.update(lambda p: opt.step(p, grads, 0.1))
            assert all(isinstance(p, jax.Array) and p.dtype == f32 for p in fast.params.values()), name
            assert all(isinstance(b, jax.Array) and b.dtype == f32 for b in opt.buffer_arrays()), name
    assert all(p.dtype == f32 for p in fast.numpy_params().values())
    nll, _ = fast.token_nll(X, Y, fast.begin_state(B))
    assert isinstance(nll, np.ndarray) and nll.dtype == np.float64 and nll.shape == (T * B,)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("mode", ["norm", "value"])
def test_shared_clipping_and_optimizers_run_on_jax_arrays(name, mode):
    """optim's clipping and update rules give the same numbers on jax arrays as on numpy arrays, keep jax
    arrays jax arrays, and their checkpointed state (numpy) restores onto jax parameters."""
    rng = np.random.default_rng(0)
    shapes = {"W_xh": (5, 4), "W_hh": (4, 4), "b_h": (4,), "W_hq": (4, 5), "b_q": (5,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    steps = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(4)]
    as_jax = lambda d: {k: jax.numpy.asarray(v) for k, v in d.items()}
    runs = {}
    for kind, convert in (("numpy", dict), ("jax", as_jax)):
        opt, p = optim.make_optimizer(name, weight_decay=0.1), convert(params)
        for i, g in enumerate(steps):
            if i == 2:                                  # a checkpoint round trip half way
                meta, arrays = opt.state_dict()
                assert all(type(a) is np.ndarray for a in arrays.values())
                opt = optim.make_optimizer(name, weight_decay=0.1)
                opt.load_state_dict(meta, arrays, p)
                assert all(type(b) is type(p["W_hh"]) for b in opt.buffer_arrays())
            g, norm, clipped = optim.clip(convert(g), 0.5, mode)
            assert clipped and isinstance(norm, float)
            p = opt.step(p, g, 0.1)
        runs[kind] = p
    for k in params:
        assert isinstance(runs["jax"][k], jax.Array)
        assert rel_err(runs["numpy"][k], runs["jax"][k]) < 1e-13, k


# optax's transformations next to rnnlab's update rules, clipped by the global norm first. Where the
# formulas are the same function of the same numbers, 20 steps of training agree to rounding.
#   sgd:      W -= lr g (optax.sgd)
#   momentum: v = mu v + g; W -= lr v (optax.sgd with momentum: its `trace` is that v)
#   L2:       g + wd W on the W_* only (optax.add_decayed_weights with a mask), then the update
#   adam:     rnnlab computes lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t)), which is
#             optax's lr m_hat / (sqrt(v_hat) + eps) with eps_root = 0 rearranged: the same eps placement,
#             so only rounding differs
#   adamw:    rnnlab shrinks W by lr wd W, then takes the Adam step; optax adds wd W to the Adam direction
#             before scaling by -lr: the same new W, decaying only the W_* matrices (optax's mask)
WD = 0.05


def _weights_only(params):
    return {k: optim.decays(k) for k in params}


def _optax(name, lr, theta):
    optax = pytest.importorskip("optax")
    rule = {"sgd": lambda: optax.sgd(lr),
            "sgd-l2": lambda: optax.chain(optax.add_decayed_weights(WD, mask=_weights_only), optax.sgd(lr)),
            "momentum": lambda: optax.sgd(lr, momentum=0.9),
            "adam": lambda: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
            "adamw": lambda: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD, mask=_weights_only)}
    return optax.chain(optax.clip_by_global_norm(theta), rule[name]())


@pytest.mark.parametrize("name, lr", [("sgd", 0.5), ("sgd-l2", 0.5), ("momentum", 0.2), ("adam", 0.02),
                                      ("adamw", 0.02)])
def test_optax_computes_rnnlab_updates(name, lr):
    optax = pytest.importorskip("optax")
    V, H, B, T, theta = 9, 12, 4, 7, 0.8              # the shapes of the epochs test below: one compile
    params = random_params(V, H, np.float64, scale=0.4)
    ours, theirs = JaxBackend(params), JaxBackend(params)
    opt = optim.make_optimizer(name.removesuffix("-l2"), weight_decay=WD if name in ("sgd-l2", "adamw") else 0.0,
                               momentum=0.9)
    tx = _optax(name, lr, theta)
    opt_state = tx.init(theirs.params)
    rng = np.random.default_rng(3)
    clipped = 0
    for _ in range(20):
        X, Y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
        _, grads, _ = ours.loss_and_grads(X, Y, ours.begin_state(B))
        grads, _, c = optim.clip(grads, theta)
        clipped += c
        ours.update(lambda p: opt.step(p, grads, lr))
        _, grads, _ = theirs.loss_and_grads(X, Y, theirs.begin_state(B))
        updates, opt_state = tx.update(grads, opt_state, theirs.params)
        theirs.update(lambda p: optax.apply_updates(p, updates))
    assert 0 < clipped < 20                                 # both sides of the clipping threshold
    for k in params:
        assert rel_err(ours.params[k], theirs.params[k]) < 1e-12, k
        assert rel_err(params[k], ours.params[k]) > 1e-3, k  # and the weights did move


def test_epochs_of_training_agree_float64():
    V, H = 9, 12
    corpus = np.random.default_rng(0).integers(0, V, 700)
    params = cells.init_params(V, H, np.random.default_rng(1), np.float64)
    for sampling in ("sequential", "random"):
        cfg = TrainConfig(batch_size=4, num_steps=7, sampling=sampling, lr=1.0, theta=1.0, dtype="float64")
        ref, fast = NumpyBackend(params), JaxBackend(params)
        for _ in range(3):
            a = train.train_epoch(ref, corpus, cfg, np.random.default_rng(7))
            b = train.train_epoch(fast, corpus, cfg, np.random.default_rng(7))
            assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10) and a.clipped == b.clipped
        for name in params:
            assert rel_err(ref.params[name], fast.params[name]) < 1e-10, name


@pytest.mark.parametrize("arch, dropout", [(None, 0.0), ("lstm-2layer-embed", 0.3)])
def test_weight_drop_agrees_and_never_touches_the_weights(arch, dropout):
    """The loss with weight masks is that of W * M and its gradient carries M, the stored weights stay as
    they were bit for bit; then two epochs with weight drop (and dropout) agree with numpy."""
    V, H, B, T = 9, 8, 4, 7
    corpus = np.random.default_rng(0).integers(0, V, 500)
    params = random_params(V, H, np.float64, scale=0.3, **(ARCHS[arch] if arch else {}))
    ref, fast = NumpyBackend(params), JaxBackend(params)
    weight_masks = network.weight_drop_masks(np.random.default_rng(3), 0.5, fast.arch, np.float64)
    masks = network.dropout_masks(np.random.default_rng(4), dropout, fast.arch.num_layers, B, T, H, np.float64)
    X, Y = random_batch(V, B, T)
    loss, grads, _ = fast.loss_and_grads(X, Y, fast.begin_state(B), masks, weight_masks)
    assert all(np.array_equal(fast.params[k], params[k]) for k in params)
    masked = NumpyBackend({k: v * weight_masks[k] if k in weight_masks else v for k, v in params.items()})
    ref_loss, ref_grads, _ = masked.loss_and_grads(X, Y, masked.begin_state(B), masks)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for k in params:
        expected = ref_grads[k] * weight_masks[k] if k in weight_masks else ref_grads[k]
        assert rel_err(grads[k], expected) < 1e-10, k

    cfg = TrainConfig(batch_size=B, num_steps=T, lr=0.5, theta=1.0, dtype="float64")
    for _ in range(2):
        a = train.train_epoch(ref, corpus, cfg, np.random.default_rng(7), dropout=dropout, weight_drop=0.4)
        b = train.train_epoch(fast, corpus, cfg, np.random.default_rng(7), dropout=dropout, weight_drop=0.4)
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10) and a.clipped == b.clipped
    for k in params:
        assert rel_err(ref.params[k], fast.params[k]) < 1e-10, k


@pytest.mark.parametrize("arch", [None, pytest.param("lstm-2layer-embed", marks=pytest.mark.slow)])
def test_scoring_decoding_and_dynamic_evaluation_agree(arch):
    V, H = 8, 10
    params = random_params(V, H, np.float64, scale=0.4, **(ARCHS[arch] if arch else {}))
    ref, fast = NumpyBackend(params), JaxBackend(params)
    tokens = np.random.default_rng(3).integers(0, V, 257)
    nll_ref, nll_fast = evaluate.stream_nll(ref, tokens, chunk=64), evaluate.stream_nll(fast, tokens, chunk=64)
    assert nll_fast.dtype == np.float64 and nll_fast.shape == (256,)
    assert rel_err(nll_ref, nll_fast) < 1e-10
    assert fast.begin_state(1).shape == (ref.arch.num_state_slices, 1, H)
    for temperature in (0.0, 0.8):                      # greedy, then sampled from the same seed
        outs = [decoding.generate(b.decoder(), b.begin_state(3), [1, 2, 3], 20, temperature,
                                  np.random.default_rng(5)) for b in (ref, fast)]
        np.testing.assert_array_equal(*outs)
    assert_dynamic_evaluation_agrees(ref, fast, tokens)


# ---- the compiled greedy loop: its steps' tokens, and their logits and state to rounding ----

GREEDY_V = 11
GREEDY = [pytest.param(dict(cell="rnn"), 48, np.float32, id="book-fused"),
          pytest.param(dict(cell="rnn"), 9, np.float64, id="book-wide-output"),
          pytest.param("onehot", 48, np.float32, id="book-onehot"),
          pytest.param("relu", 48, np.float32, id="book-relu")]
GREEDY += [pytest.param(ARCHS[name], H, dtype, id=f"{name}-H{H}")
           for name, H, dtype in (("rnn-2layer-embed", 48, np.float32), ("gru-2layer-embed", 48, np.float32),
                                  ("lstm", 12, np.float32), ("lstm-2layer-embed", 48, np.float64),
                                  ("lstm-3layer", 9, np.float32), ("rnn-nn", 48, np.float64),
                                  ("gru-nn", 12, np.float32), ("lstm-nn-2layer", 12, np.float32))]


def greedy_backend(arch, H, dtype, seed=0):
    special = {"onehot": dict(onehot_input=True), "relu": dict(activation="relu")}
    kwargs = special.get(arch, {}) if isinstance(arch, str) else {}
    arch = {} if isinstance(arch, str) else arch
    return JaxBackend(random_params(GREEDY_V, H, dtype, scale=1.0, seed=seed, **arch), **kwargs)


@pytest.mark.parametrize("arch, H, dtype", GREEDY)
def test_the_greedy_loop_decodes_as_its_steps(arch, H, dtype):
    """H=48 and H=12 (LSTM) make the output layer narrow enough that the loop multiplies [W_h | W_hq] in one
    matmul; H=9 keeps them apart; the GRU always computes its own products. XLA picks its kernels by shape,
    so the logits are the steps' to rounding; here the tokens are the steps' too."""
    b = greedy_backend(arch, H, dtype)
    feed, never = np.array([2, 5, 1]), (0, 3)
    begin = random_state(b.arch.num_state_slices, 1, H, dtype, scale=3)
    ids, logits, state = b.decoder().greedy(feed, begin, 40, never)
    ref_ids, ref_logits, ref_state = decoding.greedy_steps(b.step, feed, begin, 40, never)
    assert ids.dtype == np.int64 and logits.dtype == dtype and state.dtype == dtype
    assert ids.tolist() == ref_ids.tolist() and not set(ids.tolist()) & set(never)
    assert rel_err(logits, ref_logits) < TOL[dtype] and rel_err(np.asarray(state), np.asarray(ref_state)) < TOL[dtype]


def test_the_greedy_loop_gives_the_same_text_however_it_is_cut():
    """An RNN with H=513 over V=28: on the development machine the loop's logits differ from the steps'
    in their last bits (XLA picks its kernels by shape), and its text leaves the steps' after 137
    characters. The loop carries its recurrent products from call to call, so its text is the same in one
    call, in chunks (looking for stop texts that never come) and streamed."""
    V = 28
    b = JaxBackend(random_params(V, 513, np.float32, scale=1.5 / np.sqrt(513), seed=0))
    text = [chr(65 + i) for i in range(V)]
    args = (b.begin_state(1), [1, 2, 3], text, 600)
    whole = decoding.continuations(b.decoder(), *args)[0]
    chunked = decoding.continuations(b.decoder(), *args, stop=("never written",))[0]
    streamed = decoding.joined(decoding.stream(b.decoder(), *args), 1)[0]
    assert len(whole) == 600 and whole == chunked == streamed


def test_the_greedy_loop_continues_where_it_stopped_and_follows_updates():
    b = greedy_backend(dict(cell="lstm", num_layers=2), 12, np.float32)
    step = b.decoder()
    whole, _, end = step.greedy([1, 2], b.begin_state(1), 30)
    first, _, state = step.greedy([1, 2], b.begin_state(1), 12)
    rest, _, state = step.greedy(first[-1:], state, 18)
    assert np.concatenate([first, rest]).tolist() == whole.tolist()
    np.testing.assert_array_equal(np.asarray(state), np.asarray(end))
    none, logits, same = step.greedy([4], state, 0)              # nothing fed, nothing chosen: the same state
    assert none.shape == (0,) and logits.shape == (0, GREEDY_V)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(state))
    _, _, fed = step.greedy([4, 7, 1], state, 0)                  # the prompt's steps but the last
    _, _, ref = decoding.greedy_steps(b.step, [4, 7, 1], state, 0)
    _, after_two = b.step(np.array([7]), b.step(np.array([4]), state)[1])
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(after_two))
    assert rel_err(np.asarray(fed), np.asarray(ref)) < TOL[np.float32]
    wider = jax.numpy.asarray(np.asarray(state), dtype=np.float64)     # a state the step would promote
    ids, logits, _ = step.greedy([4], wider, 5)
    ref_ids, ref_logits, _ = decoding.greedy_steps(b.step, [4], wider, 5)
    assert ids.tolist() == ref_ids.tolist() and logits.dtype == np.float64
    np.testing.assert_array_equal(logits, ref_logits)
    with pytest.raises(ValueError, match="at least one token"):
        step.greedy([], state, 3)
    b.update(lambda params: {k: v * 1.5 for k, v in params.items()})    # new weights: the loop sees them
    ids, logits, _ = b.decoder().greedy([1, 2], b.begin_state(1), 30)
    ref_ids, ref_logits, _ = decoding.greedy_steps(b.step, [1, 2], b.begin_state(1), 30)
    assert ids.tolist() == ref_ids.tolist() and rel_err(logits, ref_logits) < TOL[np.float32]


def test_generate_with_the_loop_writes_the_text_of_the_generic_loop():
    """On this shape, `LM.generate`'s greedy text on the jax backend (the compiled loop, in chunks where
    stop texts are looked for) is the text `decoding.stream` makes over the plain step, with and without
    stop texts."""
    b = greedy_backend(dict(cell="rnn"), 48, np.float32, seed=4)
    text = [chr(97 + i) for i in range(GREEDY_V)]
    plain = lambda X, s: b.step(X, s)                            # noqa: E731 - a step without a loop
    for stop in ((), ("ab",), ("k", "ca")):
        made = decoding.continuations(b.decoder(), b.begin_state(1), [1, 2], text, 300, stop=stop, never=(0,))
        ref = decoding.joined(decoding.stream(plain, b.begin_state(1), [1, 2], text, 300, stop=stop, never=(0,)), 1)
        assert made == ref, stop


# ---- the training API and the command line: The Time Machine, 400 training tokens, H=8 ----

DATA_CFG = DataConfig(max_tokens=400)
MODEL = ModelConfig(num_hiddens=8)
BASE = TrainConfig(batch_size=4, num_steps=5, num_epochs=3, log_every=1, backend="jax", num_preds=3,
                   theta=0.05, lr=0.5)        # theta small enough that clipping fires at every step


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 0.01)])
def test_resume_is_bit_exact_while_clipping_fires(tmp_path, monkeypatch, optimizer, lr):
    needs_corpus()
    cfg = dataclasses.replace(BASE, optimizer=optimizer, lr=lr)
    _, resumed, records = assert_resume_is_bit_exact(tmp_path, monkeypatch, DATA_CFG, MODEL, cfg)
    assert resumed.backend.name == "jax" and all(r["backend"] == "jax" for r in records)


@pytest.mark.parametrize("first, then", [("jax", "numpy"), ("numpy", "jax"),
                                         pytest.param("jax", "torch", marks=pytest.mark.slow)])
def test_checkpoints_move_between_backends(tmp_path, first, then):
    """One epoch on one backend, two more on another from its checkpoint (safetensors both ways): the same
    run, to float32 rounding, as three epochs on numpy."""
    needs_corpus()
    if "torch" in (first, then):
        pytest.importorskip("torch")
    cfg = dataclasses.replace(BASE, backend="numpy")
    straight = train.new_run(DATA_CFG, MODEL, cfg)
    train.fit(straight, tmp_path / "straight", progress=False, log=lambda s: None)
    half = train.new_run(DATA_CFG, MODEL, dataclasses.replace(cfg, num_epochs=1, backend=first))
    train.fit(half, tmp_path / "split", progress=False, log=lambda s: None)
    resumed = train.resume_run(tmp_path / "split", train={"num_epochs": 3, "backend": then})
    assert resumed.backend.name.split("-")[0] == then
    train.fit(resumed, tmp_path / "split", progress=False, log=lambda s: None)
    records = train.read_metrics(tmp_path / "split")
    assert [r["backend"].split("-")[0] for r in records] == [first, then, then]
    a, b = straight.backend.numpy_params(), resumed.backend.numpy_params()
    for name in a:
        assert b[name].dtype == np.float32 and rel_err(a[name], b[name]) < 1e-4, name
    expected = [r["val_ppl"] for r in train.read_metrics(tmp_path / "straight")]
    assert [r["val_ppl"] for r in records] == pytest.approx(expected, rel=1e-4)


def test_a_flax_initialised_run_trains_from_orthogonal_recurrent_weights(tmp_path):
    needs_corpus()
    cfg = dataclasses.replace(BASE, num_epochs=2, theta=1.0, lr=1.0)
    run = train.new_run(DATA_CFG, dataclasses.replace(MODEL, init="flax"), cfg)
    W_hh = run.backend.numpy_params()["W_hh"].astype(np.float64)
    np.testing.assert_allclose(W_hh.T @ W_hh, np.eye(8), atol=1e-6)
    records = train.fit(run, None, progress=False, log=lambda s: None)
    assert records[1]["train_ppl"] < records[0]["train_ppl"]


def _cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CLI_TINY = ["train", "--num-hiddens", "8", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "400",
            "--num-epochs", "2", "--log-every", "1", "--backend", "jax", "--quiet", "--num-preds", "3"]


def test_the_cli_trains_with_jax_and_records_it(tmp_path, capsys):
    needs_corpus()
    code, out, err = _cli(capsys, *CLI_TINY, "--out", tmp_path / "run")
    assert code == 0, err
    assert "backend jax, float32, device cpu" in err and "training tokens/s on jax" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in records] == ["jax", "jax"]
    ckpt = checkpoint.load(tmp_path / "run")
    assert ckpt.extra["backend"] == "jax" and ckpt.config["train"]["backend"] == "jax"


def test_without_jax_the_cli_names_the_extra(tmp_path, capsys, monkeypatch):
    needs_corpus()
    real = importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name, *a: None if name == "jax" else
                        real(name, *a))
    for device in ("auto", "cuda"):
        code, _, err = _cli(capsys, *CLI_TINY, "--device", device)
        assert code == 1 and "Traceback" not in err
        assert len(err.splitlines()) == 1 and "rnnlab[jax]" in err, err


def test_devices_and_make_backend():
    params = random_params(5, 4, np.float32)
    backend = make_backend("jax", params)
    assert type(backend) is JaxBackend and backend.name == "jax" and backend.device == "cpu"
    assert backend.params["W_hh"].devices() == {jax.devices("cpu")[0]}
    assert make_backend("jax", params, device="auto").device == ("cuda:0" if jax_has_gpu() else "cpu")
    check_device("cpu", "jax")
    with pytest.raises(RnnlabError, match="cpu, cuda or cuda:N"):
        check_device("tpu", "jax")
    with pytest.raises(RnnlabError, match="no --matmul-dtype bfloat16"):
        make_backend("jax", params, matmul_dtype="bfloat16")
    if jax_has_gpu():
        assert resolve_device("auto", "jax") == "cuda"
        assert make_backend("jax", params, device="cuda").device == "cuda:0"
        with pytest.raises(RnnlabError, match="numbered from 0"):
            check_device(f"cuda:{len(jax.devices('gpu'))}", "jax")
    else:
        assert resolve_device("auto", "jax") == "cpu"
        for device in ("cuda", "cuda:0"):
            with pytest.raises(RnnlabError, match="JAX has no GPU"):
                check_device(device, "jax")
            with pytest.raises(RnnlabError, match="JAX has no GPU"):
                make_backend("jax", params, device=device)
