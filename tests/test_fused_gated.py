"""The fused torch path for stacks of RNN, GRU and LSTM cells (`torch_gated`) against the numpy reference:
same weights, same batches, same dropout and weight-drop masks, same numbers.

float64: losses, gradients, states and scores agree to ~1e-10 relative; float32 to ~1e-5; bf16 matmuls stay
close to float32 without equalling it. Runs on CUDA too when it is present.
"""
import numpy as np
import pytest

from helpers import (ARCHS, as_np, assert_bf16_close, assert_bf16_scoring, assert_dynamic_evaluation_agrees,
                     assert_masked_grads_agree, assert_weight_drop_is_an_argument, random_batch, random_params,
                     random_state, rel_err)
from rnnlab import decoding, evaluate, network
from rnnlab.backends import make_backend, torch_paths
from rnnlab.backends.numpy_backend import NumpyBackend
from rnnlab.config import TrainConfig
from rnnlab.errors import RnnlabError
from rnnlab.train import train_epoch

torch = pytest.importorskip("torch")
from rnnlab.backends.torch_fused import TorchFusedBackend  # noqa: E402
from rnnlab.backends.torch_gated import TorchGatedBackend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BOOK_VARIANT = [a for a, kw in ARCHS.items() if kw.get("cell_variant", "book") == "book"]
TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _case(arch, dtype, seed=0):
    V, H, B, T = 9, 6, 3, 5
    params = random_params(V, H, dtype, scale=0.4, seed=seed, **ARCHS.get(arch, {}))
    return params, V, H, B, T


@pytest.mark.parametrize("arch", BOOK_VARIANT + ["book-rnn"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_loss_grads_state_and_scores_agree_with_dropout_and_weight_drop(arch, dtype, device):
    params, V, H, B, T = _case(arch, dtype)
    ref, fast = NumpyBackend(params), TorchGatedBackend(params, device=device)
    a = ref.arch
    X, Y = random_batch(V, B, T)
    state = random_state(a.num_state_slices, B, H, dtype, scale=0.3)
    masks = network.dropout_masks(np.random.default_rng(4), 0.3, a.num_layers, B, T, H, dtype)
    weight_masks = network.weight_drop_masks(np.random.default_rng(5), 0.3, a, dtype)
    l1, g1, s1 = ref.loss_and_grads(X, Y, state, masks, weight_masks)
    l2, g2, s2 = fast.loss_and_grads(X, Y, torch.tensor(state, device=device), masks, weight_masks)
    tol = TOL[dtype]
    assert l1 == pytest.approx(l2, rel=tol)
    assert s2.shape == (a.num_state_slices, B, H) and rel_err(s1, as_np(s2)) < tol
    assert set(g2) == set(params)
    for name in params:
        assert g2[name].shape == params[name].shape and rel_err(g1[name], as_np(g2[name])) < tol, name
    n1, t1 = ref.token_nll(X, Y, state)
    n2, t2 = fast.token_nll(X, Y, torch.tensor(state, device=device))
    assert rel_err(n1, n2) < tol and rel_err(t1, as_np(t2)) < tol


@pytest.mark.parametrize("arch", ["rnn-2layer-embed", "book-rnn"])
def test_relu_stacks_agree(arch):
    params, V, H, B, T = _case(arch, np.float64)
    assert_masked_grads_agree(NumpyBackend(params, "relu"), TorchGatedBackend(params, "relu"), V, B, T)


@pytest.mark.parametrize("arch, sampling", [("lstm-2layer-embed", "sequential"), ("gru", "random"),
                                            ("rnn-2layer-embed", "sequential")])
def test_epochs_of_training_agree_float64(arch, sampling):
    """Whole epochs through the training loop: carried state, dropout, weight drop, clipping, SGD."""
    V, H = 9, 8
    corpus = np.random.default_rng(0).integers(0, V, 500)
    params = random_params(V, H, np.float64, scale=0.3, **ARCHS[arch])
    cfg = TrainConfig(batch_size=4, num_steps=7, lr=0.5, theta=0.02, sampling=sampling, dtype="float64")
    ref, fast = NumpyBackend(params), make_backend("torch", params, torch_impl="fused", dropout=0.3)
    assert type(fast) is TorchGatedBackend
    for _ in range(2):
        a = train_epoch(ref, corpus, cfg, np.random.default_rng(7), dropout=0.3, weight_drop=0.4)
        b = train_epoch(fast, corpus, cfg, np.random.default_rng(7), dropout=0.3, weight_drop=0.4)
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10) and a.clipped == b.clipped
    assert a.clipped                                                          # clipping fired
    for name in params:
        assert rel_err(ref.params[name], as_np(fast.params[name])) < 1e-10, name


@pytest.mark.parametrize("arch", ["gru-2layer-embed", "lstm"])
def test_weight_drop_is_an_argument_that_never_touches_the_weights(arch):
    params = random_params(7, 5, np.float64, **ARCHS[arch])
    assert_weight_drop_is_an_argument(TorchGatedBackend(params), params, 7, 3, 4)


@pytest.mark.parametrize("arch", ["rnn-2layer-embed", "gru", "gru-2layer-embed", "lstm-2layer-embed"])
def test_bf16_forward_is_autocasts(arch):
    """The fused path's bf16 matmuls round as torch.autocast's do: the same loss and state to float32
    precision, gradients within bf16's rounding of their products (a tanh RNN stack at this scale drifts
    9% from float32 in bf16 either way, so autocast, not float32, is the reference for it)."""
    V, H, B, T = 28, 64, 8, 12
    params = random_params(V, H, np.float32, scale=0.2, **ARCHS[arch])
    auto = make_backend("torch", params, torch_impl="autograd", matmul_dtype="bfloat16")
    fused = make_backend("torch", params, torch_impl="fused", matmul_dtype="bfloat16")
    X, Y = random_batch(V, B, T)
    state = torch.tensor(random_state(auto.arch.num_state_slices, B, H, np.float32))
    l1, g1, s1 = auto.loss_and_grads(X, Y, state)
    l2, g2, s2 = fused.loss_and_grads(X, Y, state)
    assert l1 == pytest.approx(l2, rel=1e-6) and rel_err(as_np(s1), as_np(s2)) < 1e-6
    for name in params:
        assert rel_err(as_np(g1[name]), as_np(g2[name])) < 2e-2, name


@pytest.mark.parametrize("arch", ["gru", "gru-2layer-embed", "lstm-2layer-embed", "lstm-3layer"])
def test_bf16_matmuls_stay_close_to_float32(arch):
    """bf16 operands with float32 master weights, states and sums: close to float32, not equal."""
    V, H = 28, 64
    params = random_params(V, H, np.float32, scale=0.2, **ARCHS[arch])
    exact = TorchGatedBackend(params)
    low = make_backend("torch", params, torch_impl="fused", matmul_dtype="bfloat16")
    assert type(low) is TorchGatedBackend and low.low_precision
    assert_bf16_close(exact, low, params, V)
    assert_bf16_scoring(exact, low, np.random.default_rng(5).integers(0, V, 200))


@pytest.mark.parametrize("arch", ["gru-2layer-embed", "lstm-2layer-embed"])
def test_bf16_with_dropout_and_weight_drop_stays_close_and_shapes_can_change(arch):
    """bf16 with both kinds of masks, then a scoring call of another shape between two training steps: the
    bf16 shadow buffers follow the shapes, and every result stays close to float32's."""
    V, H, B, T = 28, 64, 8, 12
    params = random_params(V, H, np.float32, scale=0.2, **ARCHS[arch])
    exact, low = TorchGatedBackend(params), TorchGatedBackend(params, matmul_dtype=torch.bfloat16)
    a = exact.arch
    masks = network.dropout_masks(np.random.default_rng(4), 0.3, a.num_layers, B, T, H, np.float32)
    weight_masks = network.weight_drop_masks(np.random.default_rng(5), 0.3, a, np.float32)
    X, Y = random_batch(V, B, T)
    state = torch.tensor(random_state(a.num_state_slices, B, H, np.float32, scale=0.3))
    for _ in range(2):
        l1, g1, s1 = exact.loss_and_grads(X, Y, state, masks, weight_masks)
        l2, g2, s2 = low.loss_and_grads(X, Y, state, masks, weight_masks)
        assert l1 != l2 and l1 == pytest.approx(l2, rel=5e-3) and rel_err(as_np(s1), as_np(s2)) < 3e-2
        for name in params:
            assert rel_err(as_np(g1[name]), as_np(g2[name])) < 5e-2, name
        Xs, Ys = random_batch(V, 1, 33, seed=9)
        n1, _ = exact.token_nll(Xs, Ys, exact.begin_state(1))
        n2, _ = low.token_nll(Xs, Ys, low.begin_state(1))
        assert n1.shape == n2.shape == (33,) and rel_err(n1, n2) < 3e-2


@pytest.mark.parametrize("arch", ["gru", "lstm-2layer-embed"])
def test_dynamic_evaluation_and_decoding_agree(arch):
    params = random_params(7, 9, np.float64, scale=0.4, **ARCHS[arch])
    tokens = np.random.default_rng(4).integers(0, 7, 300)
    assert_dynamic_evaluation_agrees(NumpyBackend(params), TorchGatedBackend(params), tokens)
    ref, fast = NumpyBackend(params), TorchGatedBackend(params)
    ppl = [evaluate.score_stream(b, tokens, chunk=40)["perplexity"] for b in (ref, fast)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-10)
    outs = [decoding.generate(b.decoder(), b.begin_state(2), [1, 2], 10) for b in (ref, fast)]
    np.testing.assert_array_equal(*outs)


def test_buffers_are_reused_and_shapes_can_change():
    """The work buffers follow the batch's shape: a smaller last minibatch, then the full one again."""
    params = random_params(9, 6, np.float64, scale=0.4, **ARCHS["lstm-2layer-embed"])
    ref, fast = NumpyBackend(params), TorchGatedBackend(params)
    for B, T in ((3, 5), (2, 4), (3, 5)):
        X, Y = random_batch(9, B, T, seed=B * T)
        l1, g1, _ = ref.loss_and_grads(X, Y, ref.begin_state(B))
        l2, g2, _ = fast.loss_and_grads(X, Y, fast.begin_state(B))
        assert l1 == pytest.approx(l2, rel=1e-10)
        assert max(rel_err(g1[k], as_np(g2[k])) for k in params) < 1e-10


def test_auto_picks_the_fused_path_for_every_book_variant_network():
    book = random_params(5, 4, np.float32)
    assert type(make_backend("torch", book)) is TorchFusedBackend                # the §8.5 model's own path
    assert type(make_backend("torch", book, dropout=0.2)) is TorchGatedBackend   # dropout: the stack's
    for arch in BOOK_VARIANT:
        backend = make_backend("torch", random_params(5, 4, np.float32, **ARCHS[arch]))
        assert type(backend) is TorchGatedBackend and backend.name == "torch-fused", arch
    nn = random_params(5, 4, np.float32, **ARCHS["gru-nn"])
    assert "fused" not in torch_paths(nn) and make_backend("torch", nn).name == "torch-nn"
    with pytest.raises(RnnlabError, match="it can run on: nn, autograd, compile"):
        make_backend("torch", nn, torch_impl="fused")                        # never a silent fallback
    with pytest.raises(RnnlabError, match="it can run on: autograd$"):
        make_backend("torch", random_params(5, 4, np.float32, **ARCHS["gru"]), torch_impl="fused",
                     onehot_input=True)
    with pytest.raises(ValueError, match="book variant"):
        TorchGatedBackend(nn)
