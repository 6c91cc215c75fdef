"""Small builders and checks shared by the tests."""
import contextlib
import dataclasses
import io

import numpy as np
import pytest

from rnnlab import cells, evaluate, network


def random_params(V=5, H=4, dtype=np.float64, scale=0.5, seed=0, **arch):
    """Parameters large enough that the nonlinearity and every gradient path matter. `arch` takes
    init_params' cell, num_layers and embed_size."""
    rng = np.random.default_rng(seed)
    params = cells.init_params(V, H, rng, dtype, **arch)
    return {k: (rng.standard_normal(v.shape) * scale).astype(dtype) for k, v in params.items()}


def random_batch(V=5, B=2, T=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), 1e-30))


# networks beyond the book's RNN, as init_params keywords: every cell, depth and input kind
ARCHS = {
    "rnn-2layer-embed": dict(cell="rnn", num_layers=2, embed_size=3),
    "gru": dict(cell="gru"),
    "gru-2layer-embed": dict(cell="gru", num_layers=2, embed_size=3),
    "lstm": dict(cell="lstm"),
    "lstm-2layer-embed": dict(cell="lstm", num_layers=2, embed_size=3),
    "lstm-3layer": dict(cell="lstm", num_layers=3),
    # torch.nn's form: two biases per gate, the GRU's reset gate after its recurrent matmul
    "rnn-nn": dict(cell="rnn", cell_variant="nn"),
    "gru-nn": dict(cell="gru", cell_variant="nn"),
    "gru-nn-2layer-embed": dict(cell="gru", num_layers=2, embed_size=3, cell_variant="nn"),
    "lstm-nn-2layer": dict(cell="lstm", num_layers=2, cell_variant="nn"),
}


def random_state(S, B, H, dtype=np.float64, seed=2, scale=0.5):
    """A carried (non-zero) state (S, B, H)."""
    return (np.random.default_rng(seed).standard_normal((S, B, H)) * scale).astype(dtype)


def as_np(x):
    """A torch tensor, jax array or numpy array as numpy."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def reversed_load(real_load):
    """checkpoint.load, with the parameters and optimizer buffers handed back in reverse order."""
    def load(directory):
        ckpt = real_load(directory)
        ckpt.params = dict(reversed(list(ckpt.params.items())))
        ckpt.optimizer_arrays = dict(reversed(list(ckpt.optimizer_arrays.items())))
        return ckpt
    return load


def assert_resume_is_bit_exact(tmp_path, monkeypatch, data_cfg, model, cfg):
    """Train `cfg` straight through in tmp_path/straight, and again stopped after its first epoch and resumed
    from that checkpoint (read back with its parameters and buffers in reverse order, as another process may
    hand them back) in tmp_path/split; clipping fires at every step of both. The final weights and every
    logged held-out figure are the same bits. Returns (straight run, resumed run, the split run's records)."""
    from rnnlab import checkpoint, train
    quiet = dict(progress=False, log=lambda s: None)
    straight = train.new_run(data_cfg, model, cfg)
    train.fit(straight, tmp_path / "straight", **quiet)
    train.fit(train.new_run(data_cfg, model, dataclasses.replace(cfg, num_epochs=1)), tmp_path / "split", **quiet)
    monkeypatch.setattr(checkpoint, "load", reversed_load(checkpoint.load))
    resumed = train.resume_run(tmp_path / "split", train={"num_epochs": cfg.num_epochs})
    assert list(resumed.backend.params) != list(straight.backend.params)       # another order, on purpose
    train.fit(resumed, tmp_path / "split", **quiet)

    records = train.read_metrics(tmp_path / "split")
    assert all(r["clip_frac"] > 0 for r in records)
    a, b = straight.backend.numpy_params(), resumed.backend.numpy_params()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert [r["val_ppl"] for r in records] == [r["val_ppl"] for r in train.read_metrics(tmp_path / "straight")]
    return straight, resumed, records


def assert_dynamic_evaluation_agrees(ref, fast, tokens):
    """Dynamic evaluation (score a segment, then one step on it), by the SGD rule and then by the RMS rule,
    gives the same score and the same adapted weights on two backends that start from the same float64
    weights; so do the RMS rule's gradient statistics."""
    a = evaluate.score_stream_dynamic(ref, tokens, lr=0.5, num_steps=32, decay=0.1)
    b = evaluate.score_stream_dynamic(fast, tokens, lr=0.5, num_steps=32, decay=0.1)
    assert a["nats_per_token"] == pytest.approx(b["nats_per_token"], rel=1e-10)
    for k, v in fast.numpy_params().items():
        np.testing.assert_allclose(v, ref.params[k], rtol=1e-9, atol=1e-12)
    ms_ref, ms_fast = (evaluate.gradient_ms(backend, tokens, 16, 40) for backend in (ref, fast))
    for k, v in ms_ref.items():
        np.testing.assert_allclose(as_np(ms_fast[k]), v, rtol=1e-8, atol=1e-20)
    a = evaluate.score_stream_dynamic(ref, tokens, lr=1e-3, num_steps=32, decay=0.1, ms=ms_ref)
    b = evaluate.score_stream_dynamic(fast, tokens, lr=1e-3, num_steps=32, decay=0.1, ms=ms_fast)
    assert a["nats_per_token"] == pytest.approx(b["nats_per_token"], rel=1e-10)
    for k, v in fast.numpy_params().items():
        np.testing.assert_allclose(v, ref.params[k], rtol=1e-8, atol=1e-12)


def assert_masked_grads_agree(ref, fast, V, B, T, tol=1e-10):
    """The loss and every gradient of a minibatch with dropout masks (p = 0.3), from the initial state,
    agree between the reference and `fast` (float64)."""
    params = ref.params
    X, Y = random_batch(V, B, T)
    masks = network.dropout_masks(np.random.default_rng(4), 0.3, ref.arch.num_layers, B, T,
                                  ref.arch.num_hiddens, np.float64)
    l1, g1, _ = ref.loss_and_grads(X, Y, ref.begin_state(B), masks)
    l2, g2, _ = fast.loss_and_grads(X, Y, fast.begin_state(B), masks)
    assert l1 == pytest.approx(l2, rel=tol)
    for name in params:
        assert rel_err(g1[name], as_np(g2[name])) < tol, name


def assert_bf16_close(exact, low, params, V=28, B=8, T=12):
    """A bf16-matmul backend against the same model in float32: close to it, not equal; the loss, the
    state, every gradient and the master weights stay float32."""
    import torch
    X, Y = random_batch(V, B, T)
    state = torch.tensor(random_state(exact.arch.num_state_slices, B, exact.arch.num_hiddens, np.float32))
    l1, g1, s1 = exact.loss_and_grads(X, Y, state)
    l2, g2, s2 = low.loss_and_grads(X, Y, state)
    assert l1 != l2 and l1 == pytest.approx(l2, rel=5e-3)
    assert s2.dtype == torch.float32 and rel_err(as_np(s1), as_np(s2)) < 3e-2
    for name in params:
        assert rel_err(as_np(g1[name]), as_np(g2[name])) < 5e-2, name
        assert g2[name].dtype == low.params[name].dtype == torch.float32


def assert_bf16_scoring(exact, low, tokens):
    """A bf16-matmul backend scores with bf16 matmuls, as it trains: close to float32, not equal, and said so."""
    a, b = evaluate.score_stream(exact, tokens), evaluate.score_stream(low, tokens)
    assert a["perplexity"] != b["perplexity"] and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-2)
    assert (a["scoring"]["matmul_dtype"], b["scoring"]["matmul_dtype"]) == ("float32", "bfloat16")


def assert_weight_drop_is_an_argument(fast, params, V=5, B=2, T=3):
    """Weight-drop masks passed to `fast.loss_and_grads` give the reference's loss of W * M and a gradient
    carrying M, and never change the backend's weights (float64)."""
    from rnnlab.backends.numpy_backend import NumpyBackend
    before = {k: as_np(v).copy() for k, v in fast.params.items()}
    weight_masks = network.weight_drop_masks(np.random.default_rng(3), 0.5, fast.arch, np.float64)
    X, Y = random_batch(V, B, T)
    loss, grads, _ = fast.loss_and_grads(X, Y, fast.begin_state(B), None, weight_masks)
    for k, v in fast.params.items():
        assert np.array_equal(as_np(v), before[k]), k
    ref = NumpyBackend({k: v * weight_masks[k] if k in weight_masks else v for k, v in params.items()})
    ref_loss, ref_grads, _ = ref.loss_and_grads(X, Y, ref.begin_state(B))
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for k in params:
        expected = ref_grads[k] * weight_masks[k] if k in weight_masks else ref_grads[k]
        assert rel_err(as_np(grads[k]), expected) < 1e-10, k


def run_cli(*argv) -> tuple[int, str, str]:
    """rnnlab.cli.main in process: (exit code, stdout, stderr); a usage error's SystemExit becomes its code."""
    from rnnlab import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, *fragments: str, exit_code: int | None = None) -> str:
    """The one line a failed command prints (no traceback), holding every fragment; returns it."""
    assert code != 0 and (exit_code is None or code == exit_code), (code, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@contextlib.contextmanager
def sigint_as_at_a_terminal():
    """Subprocesses started inside get Ctrl-C as at an interactive terminal, even when these tests run in the
    background, where a shell starts them with SIGINT ignored (which a child would inherit; a handler set
    in this process is reset to the default in the child)."""
    import signal
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
