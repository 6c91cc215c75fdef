"""numpy reference vs torch backend: same weights, same batches, same numbers.

float64: losses, gradients and clipped SGD steps agree to ~1e-10 relative; float32 to ~1e-5.
Runs on CUDA too when it is present.
"""
import numpy as np
import pytest

from helpers import (ARCHS, as_np, assert_bf16_close, assert_bf16_scoring, assert_masked_grads_agree,
                     assert_weight_drop_is_an_argument, random_batch, random_params, random_state, rel_err)
from rnnlab import cells, evaluate, decoding, network, optim
from rnnlab.backends import make_backend
from rnnlab.errors import RnnlabError
from rnnlab.backends.numpy_backend import NumpyBackend
from rnnlab.config import TrainConfig
from rnnlab.train import train_epoch

torch = pytest.importorskip("torch")
from rnnlab.backends.torch_backend import TorchBackend  # noqa: E402
from rnnlab.backends.torch_compiled import TorchCompiledBackend  # noqa: E402
from rnnlab.backends.torch_fused import TorchFusedBackend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# every torch training path: autograd over the shared forward, the fused hand-written BPTT, and the
# autograd step compiled by torch.compile
TORCH_PATHS = {"autograd": TorchBackend, "fused": TorchFusedBackend, "compile": TorchCompiledBackend}
TOL = {np.float64: 1e-10, np.float32: 1e-5}
# torch.compile spends ~10 s per new shape and dtype: the default suite compiles only these cases
FAST_COMPILE_CASES = {(np.float64, "tanh"), (np.float32, "relu")}


def compile_slow(cases, key):
    """pytest.params over `cases`; the compile path's cases outside FAST_COMPILE_CASES are marked slow."""
    return [pytest.param(*c, marks=pytest.mark.slow) if c[0] == "compile" and key(c) not in FAST_COMPILE_CASES
            else c for c in cases]




@pytest.mark.parametrize("path, dtype, activation", compile_slow(
    [(p, d, a) for p in TORCH_PATHS for d in (np.float64, np.float32) for a in ("tanh", "relu")],
    key=lambda c: c[1:]))
@pytest.mark.parametrize("device", DEVICES)
def test_loss_grads_and_clipped_step_agree(path, device, dtype, activation):
    V, H, B, T = 11, 16, 4, 6
    params = random_params(V, H, dtype, scale=0.3)
    ref, fast = NumpyBackend(params, activation), TORCH_PATHS[path](params, activation, device)
    X, Y = random_batch(V, B, T)
    state_np = np.random.default_rng(5).standard_normal((1, B, H)).astype(dtype) * 0.3
    state_t = torch.tensor(state_np, device=device)
    l1, g1, s1 = ref.loss_and_grads(X, Y, state_np)
    l2, g2, s2 = fast.loss_and_grads(X, Y, state_t)
    tol = TOL[dtype]
    assert l1 == pytest.approx(l2, rel=tol)
    assert rel_err(s1, as_np(s2)) < tol
    for name in cells.PARAM_NAMES:
        assert rel_err(g1[name], as_np(g2[name])) < tol, name
    # one clipped SGD step, through the shared optimizer code; theta small enough to clip
    g1, n1, c1 = optim.clip_grad_norm(g1, 0.1)
    g2, n2, c2 = optim.clip_grad_norm(g2, 0.1)
    assert c1 and c2 and n1 == pytest.approx(n2, rel=tol)
    ref.update(lambda params: optim.sgd(params, g1, 1.0))
    fast.update(lambda params: optim.sgd(params, g2, 1.0))
    for name in cells.PARAM_NAMES:
        assert rel_err(ref.params[name], as_np(fast.params[name])) < tol, name


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_epochs_of_training_agree_float64(path, device):
    V, H = 9, 12
    corpus = np.random.default_rng(0).integers(0, V, 700)
    params = cells.init_params(V, H, np.random.default_rng(1), np.float64)
    for sampling in ("sequential", "random"):
        cfg = TrainConfig(batch_size=4, num_steps=7, sampling=sampling, lr=1.0, theta=1.0)
        ref, fast = NumpyBackend(params), TORCH_PATHS[path](params, device=device)
        for _ in range(3):
            a = train_epoch(ref, corpus, cfg, np.random.default_rng(7))
            b = train_epoch(fast, corpus, cfg, np.random.default_rng(7))
            assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10) and a.clipped == b.clipped
        for name in cells.PARAM_NAMES:
            assert rel_err(ref.params[name], as_np(fast.params[name])) < 1e-10


@pytest.mark.parametrize("path, arch", [("fused", None), ("autograd", "gru"),
                                        pytest.param("compile", "lstm-2layer-embed", marks=pytest.mark.slow)])
def test_weight_drop_is_an_argument_that_never_touches_the_weights(path, arch):
    """The loss with masks is the loss of W * M, the gradient carries M, and the stored weights stay as they
    were, bit for bit, on every path (no in-place surgery on the backend's arrays)."""
    V, H, B, T = 7, 5, 3, 4
    params = random_params(V, H, np.float64, **(ARCHS[arch] if arch else {}))
    fast = TORCH_PATHS[path](params)
    assert_weight_drop_is_an_argument(fast, params, V, B, T)


@pytest.mark.parametrize("path, arch, dropout, locked", [("fused", None, 0.0, False),
                                                          ("autograd", "lstm-2layer-embed", 0.3, False),
                                                          ("autograd", "lstm-2layer-embed", 0.3, True),
                                                          ("autograd", "gru", 0.0, False)])
def test_epochs_with_weight_drop_agree_float64(path, arch, dropout, locked):
    V, H = 9, 8
    corpus = np.random.default_rng(0).integers(0, V, 500)
    params = random_params(V, H, np.float64, scale=0.3, **(ARCHS[arch] if arch else {}))
    cfg = TrainConfig(batch_size=4, num_steps=7, lr=0.5, theta=1.0, dtype="float64")
    ref, fast = NumpyBackend(params), TORCH_PATHS[path](params)
    for _ in range(2):
        a, b = (train_epoch(backend, corpus, cfg, np.random.default_rng(7), dropout=dropout, weight_drop=0.4,
                            locked_dropout=locked) for backend in (ref, fast))
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10) and a.clipped == b.clipped
    for name in params:
        assert rel_err(ref.params[name], as_np(fast.params[name])) < 1e-10, name
    plain = NumpyBackend(params)
    train_epoch(plain, corpus, cfg, np.random.default_rng(7), dropout=dropout, locked_dropout=locked)
    W_h = network.recurrent_weight_names(ref.arch)[0]
    assert rel_err(plain.params[W_h], ref.params[W_h]) > 1e-3             # weight drop changed the training


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_and_decoding_agree(device):
    V, H = 8, 10
    params = random_params(V, H, np.float64, scale=0.4)
    ref, fast = NumpyBackend(params), TorchBackend(params, device=device)
    tokens = np.random.default_rng(3).integers(0, V, 600)
    a, b = evaluate.score_stream(ref, tokens, chunk=64), evaluate.score_stream(fast, tokens, chunk=100)
    assert a["tokens"] == b["tokens"] == 599
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-10)
    for backend in (ref, fast):
        assert backend.begin_state(1).shape == (1, 1, H)
    out_ref = decoding.generate(ref.step, ref.begin_state(3), [1, 2, 3], 20)
    out_fast = decoding.generate(fast.step, fast.begin_state(3), [1, 2, 3], 20)
    np.testing.assert_array_equal(out_ref, out_fast)


@pytest.mark.parametrize("path, arch", [("fused", "rnn"), ("autograd", "rnn"), ("autograd", "lstm-2layer-embed")])
def test_dynamic_evaluation_agrees(path, arch):
    arch_kwargs = {} if arch == "rnn" else ARCHS[arch]
    params = random_params(7, 9, np.float64, scale=0.4, **arch_kwargs)
    tokens = np.random.default_rng(4).integers(0, 7, 300)
    ref, fast = NumpyBackend(params), TORCH_PATHS[path](params)
    a = evaluate.score_stream_dynamic(ref, tokens, lr=0.5, num_steps=32, decay=0.1)
    b = evaluate.score_stream_dynamic(fast, tokens, lr=0.5, num_steps=32, decay=0.1)
    assert a["nats_per_token"] == pytest.approx(b["nats_per_token"], rel=1e-10)
    for k, v in fast.numpy_params().items():
        np.testing.assert_allclose(v, ref.params[k], rtol=1e-9, atol=1e-12)

@pytest.mark.parametrize("device", DEVICES)
def test_torch_gather_equals_onehot(device):
    params = random_params(7, 6)
    X, Y = random_batch(7, 4, 5)
    gather, onehot = TorchBackend(params, device=device), TorchBackend(params, device=device, onehot_input=True)
    lg, gg, _ = gather.loss_and_grads(X, Y, gather.begin_state(4))
    lo, go, _ = onehot.loss_and_grads(X, Y, onehot.begin_state(4))
    assert lg == pytest.approx(lo, rel=1e-13)
    for name in gg:
        assert rel_err(as_np(gg[name]), as_np(go[name])) < 1e-13


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_matmuls_stay_close_to_float32(device):
    """bf16 operands (8-bit mantissa) with float32 master weights: close, not equal, to the float32 path."""
    V, H, B, T = 28, 64, 8, 12
    params = random_params(V, H, np.float32, scale=0.2)
    exact = TorchFusedBackend(params, device=device)
    low = TorchFusedBackend(params, device=device, matmul_dtype=torch.bfloat16)
    X, Y = random_batch(V, B, T)
    l1, g1, s1 = exact.loss_and_grads(X, Y, exact.begin_state(B))
    l2, g2, s2 = low.loss_and_grads(X, Y, low.begin_state(B))
    assert l1 == pytest.approx(l2, rel=2e-3)
    assert rel_err(as_np(s1), as_np(s2)) < 3e-2
    for name in cells.PARAM_NAMES:
        assert rel_err(as_np(g1[name]), as_np(g2[name])) < 5e-2, name
        assert low.params[name].dtype == torch.float32                # master weights stay float32


@pytest.mark.parametrize("impl, matmul_dtype, expected", [
    ("fused", "same", TorchFusedBackend), ("fused", "bfloat16", TorchFusedBackend),
    ("autograd", "same", TorchBackend), ("autograd", "bfloat16", TorchBackend),
    ("compile", "same", TorchCompiledBackend), ("compile", "bfloat16", TorchCompiledBackend)])
def test_make_backend_picks_the_named_torch_path(impl, matmul_dtype, expected):
    backend = make_backend("torch", random_params(5, 4, np.float32), torch_impl=impl, matmul_dtype=matmul_dtype)
    assert type(backend) is expected and backend.name == f"torch-{impl}"
    assert backend.numpy_params()["W_hh"].shape == (4, 4)


@pytest.mark.parametrize("arch", ["gru", "lstm-2layer-embed"])
def test_autocast_bf16_stays_close_to_float32(arch):
    """Autograd under bf16 autocast: close to, not equal to, float32; master weights and state stay float32."""
    V, H, B, T = 28, 64, 8, 12
    params = random_params(V, H, np.float32, scale=0.2, **ARCHS[arch])
    exact, low = TorchBackend(params), TorchBackend(params, matmul_dtype="bfloat16")
    assert_bf16_close(exact, low, params, V, B, T)
    tokens = np.random.default_rng(5).integers(0, V, 200)
    assert_bf16_scoring(exact, low, tokens)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_deep_and_gated_networks_agree_with_dropout(arch, dtype, device):
    V, H, B, T = 9, 6, 3, 5
    params = random_params(V, H, dtype, scale=0.4, **ARCHS[arch])
    ref, fast = NumpyBackend(params), TorchBackend(params, device=device)
    a = ref.arch
    X, Y = random_batch(V, B, T)
    state = random_state(a.num_state_slices, B, H, dtype, scale=0.3)
    masks = network.dropout_masks(np.random.default_rng(4), 0.3, a.num_layers, B, T, H, dtype)
    l1, g1, s1 = ref.loss_and_grads(X, Y, state, masks)
    l2, g2, s2 = fast.loss_and_grads(X, Y, torch.tensor(state, device=device), masks)
    tol = TOL[dtype]
    assert l1 == pytest.approx(l2, rel=tol)
    assert rel_err(s1, as_np(s2)) < tol
    for name in params:
        assert rel_err(g1[name], as_np(g2[name])) < tol, name
    # scoring and decoding (no dropout) agree too
    tokens = np.random.default_rng(3).integers(0, V, 80)
    ppl = [evaluate.score_stream(b, tokens, chunk=32)["perplexity"] for b in (ref, fast)]
    assert ppl[0] == pytest.approx(ppl[1], rel=tol)
    outs = [decoding.generate(b.decoder(), b.begin_state(2), [1, 2], 10) for b in (ref, fast)]
    np.testing.assert_array_equal(*outs)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lstm-2layer-embed", "gru"])
def test_compiled_deep_networks_agree(arch):
    V, H, B, T = 9, 6, 3, 5
    params = random_params(V, H, np.float64, scale=0.4, **ARCHS[arch])
    assert_masked_grads_agree(NumpyBackend(params), TorchCompiledBackend(params), V, B, T)


def test_auto_and_named_paths_for_deep_and_one_hot_networks():
    deep = random_params(5, 4, np.float32, cell="rnn", num_layers=2)
    book = random_params(5, 4, np.float32)
    assert make_backend("torch", book).name == "torch-fused"               # auto: fused for the book's model
    auto = make_backend("torch", deep, matmul_dtype="bfloat16")
    assert auto.name == "torch-fused" and auto.low_precision               # and for any book-variant stack
    named = make_backend("torch", deep, torch_impl="autograd", matmul_dtype="bfloat16")
    assert type(named) is TorchBackend and named.name == "torch-autograd" and named.autocast
    with pytest.raises(RnnlabError, match="it can run on: autograd$"):
        make_backend("torch", book, torch_impl="compile", onehot_input=True)
    assert make_backend("numpy", book).name == "numpy"
