"""Held-out scoring in K pieces side by side: every target counted once, K = 1 is batch 1 to the bit, a warm-up
longer than the model's memory gives batch 1's figure, the cap takes the same targets every time, every
backend path scores a batch, and training and `rnnlab eval` record how each figure was scored."""
import json
import math

import numpy as np
import pytest

from helpers import assert_bf16_scoring, random_params, run_cli
from rnnlab import evaluate, ngram, train
from rnnlab.backends import make_backend
from rnnlab.backends.numpy_backend import NumpyBackend
from rnnlab.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError



class LastTokens:
    """A fake model that remembers exactly the last `memory` tokens it read: its NLL of a target is a fixed
    function of those and the target. A piece's first target is predicted after reading the warm-up and one
    token more, so a warm-up of `memory` - 1 tokens must give batch 1's numbers exactly and a shorter one must
    not. State (1, B, memory): token ids + 1, 0 for none yet."""
    name, dtype = "fake", np.float64

    def __init__(self, memory: int):
        self.memory = memory

    def begin_state(self, batch_size):
        return np.zeros((1, batch_size, self.memory))

    def token_nll(self, X, Y, state):
        context, out = state[0].copy(), []
        for t in range(X.shape[1]):
            context = np.concatenate([context[:, 1:], X[:, t:t + 1] + 1.0], axis=1)        # (B, memory)
            code = context @ np.arange(1, self.memory + 1) + 3 * Y[:, t]
            out.append(np.log(2 + code % 11))
        return np.stack(out).reshape(-1), context[None]


def batch1(backend, tokens):
    """The stream read one token after another, one call per token: the reference every layout must meet."""
    state, out = backend.begin_state(1), []
    for t in range(len(tokens) - 1):
        nll, state = backend.token_nll(tokens[None, t:t + 1], tokens[None, t + 1:t + 2], state)
        out.append(nll)
    return np.concatenate(out)


# ---- the layout ----

@pytest.mark.parametrize("n, K, W", [(100, 1, 0), (100, 4, 0), (100, 4, 10), (101, 7, 13), (10_000, 32, 256),
                                     (40, 8, 39), (40, 8, 45), (5, 9, 0)])
def test_every_target_is_counted_exactly_once(n, K, W):
    layout = evaluate.plan(n, K, W)
    assert layout.starts[0] == 0 and layout.starts[-1] == n and np.all(np.diff(layout.starts) >= 1)
    assert 1 <= layout.pieces <= K
    assert abs(int(layout.lengths.max() - layout.lengths.min())) <= 1      # the rows are balanced
    j = np.arange(layout.columns())[None, :]
    counted = (layout.first[:, None] + j)[layout.counted(j)]
    np.testing.assert_array_equal(counted, np.arange(n))                   # each target once, in stream order
    assert np.all(layout.first >= 0)


def test_auto_reads_one_stream_up_to_the_threshold():
    assert evaluate.plan(evaluate.BATCH_ABOVE).pieces == 1
    wide = evaluate.plan(evaluate.BATCH_ABOVE + 1)
    assert (wide.pieces, wide.warmup) == (evaluate.AUTO_PIECES, evaluate.WARMUP)
    assert evaluate.plan(evaluate.BATCH_ABOVE + 1, pieces=1).pieces == 1
    assert TrainConfig().eval_warmup == EvalConfig().eval_warmup == evaluate.WARMUP
    assert f"{evaluate.BATCH_ABOVE:,} tokens, {evaluate.AUTO_PIECES} above" in TrainConfig.__dataclass_fields__[
        "eval_batch"].metadata["help"]


# ---- the figure ----

def test_one_piece_is_batch_one_to_the_bit():
    backend = NumpyBackend(random_params(6, 9, scale=0.5))
    tokens = np.random.default_rng(0).integers(0, 6, 700)
    state, parts = backend.begin_state(1), []
    for start in range(0, 699, 256):                 # what scoring did before pieces, chunk by chunk
        nll, state = backend.token_nll(tokens[None, start:start + 256], tokens[None, start + 1:start + 257], state)
        parts.append(nll)
    for how in ({}, {"pieces": 1}, {"pieces": 1, "warmup": 50}):
        np.testing.assert_array_equal(evaluate.stream_nll(backend, tokens, **how), np.concatenate(parts))
    result = evaluate.score_stream(backend, tokens)
    assert result["scoring"] == {"pieces": 1, "warmup": 0, "matmul_dtype": "float64", "stream_tokens": 699}


def test_a_warmup_as_long_as_the_memory_gives_batch_one_exactly():
    fake, tokens = LastTokens(memory=5), np.random.default_rng(1).integers(0, 9, 400)
    exact = batch1(fake, tokens)
    for K in (2, 7, 16):
        for W in (4, 9):
            np.testing.assert_array_equal(evaluate.stream_nll(fake, tokens, chunk=13, pieces=K, warmup=W), exact)
        short = evaluate.stream_nll(fake, tokens, chunk=13, pieces=K, warmup=3)
        assert len(short) == len(exact) and not np.array_equal(short, exact)


def test_pieces_approach_batch_one_as_the_warmup_grows():
    """A real network forgets gradually: the gap to batch 1 shrinks with the warm-up, the token count never
    changes, and the first piece (no warm-up) is batch 1's own start."""
    backend = NumpyBackend(random_params(7, 12, scale=0.35, cell="gru"))
    tokens = np.random.default_rng(2).integers(0, 7, 900)
    exact = evaluate.score_stream(backend, tokens, pieces=1)
    gaps = []
    for W in (0, 4, 16, 64):
        r = evaluate.score_stream(backend, tokens, chunk=50, pieces=8, warmup=W)
        assert r["tokens"] == exact["tokens"] == 899 and r["scoring"]["pieces"] == 8
        gaps.append(abs(r["nats_per_token"] - exact["nats_per_token"]))
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 1e-4 and gaps[-1] < 1e-9
    nll, targets, layout = evaluate.scored_nll(backend, tokens, pieces=8, warmup=16)
    first = layout.starts[1]
    np.testing.assert_allclose(nll[:first], evaluate.stream_nll(backend, tokens, pieces=1)[:first], rtol=1e-12)


def test_the_cap_takes_the_first_targets_of_every_piece():
    backend = NumpyBackend(random_params(5, 8, scale=0.4))
    tokens = np.random.default_rng(3).integers(0, 5, 1000)
    full_nll, full_targets, layout = evaluate.scored_nll(backend, tokens, pieces=6, warmup=20)
    nll, targets, _ = evaluate.scored_nll(backend, tokens, pieces=6, warmup=20, max_tokens=300)
    assert 300 - 6 <= len(targets) <= 300
    for k in range(6):                                      # a prefix of each piece, from every piece
        mine = targets[(targets >= layout.starts[k]) & (targets < layout.starts[k + 1])]
        np.testing.assert_array_equal(mine, np.arange(layout.starts[k], layout.starts[k] + len(mine)))
        assert len(mine) > 0
    np.testing.assert_array_equal(nll, full_nll[np.isin(full_targets, targets)])      # the same numbers
    one = evaluate.score_stream(backend, tokens, pieces=1, max_tokens=300)
    assert one["tokens"] == 300 and one["scoring"]["stream_tokens"] == 999
    assert one["nats_per_token"] == pytest.approx(evaluate.stream_nll(backend, tokens[:301], pieces=1).mean(),
                                                  rel=1e-12)


def test_mixture_in_pieces_pairs_each_target_with_its_ngram_probability():
    rng = np.random.default_rng(6)
    backend = NumpyBackend(random_params(5, 8, scale=0.4))
    tokens, kn = rng.integers(0, 5, 600), ngram.KneserNey(3, 5).fit(rng.integers(0, 5, 400))
    how = {"pieces": 4, "warmup": 10, "max_tokens": 200}
    only_model = evaluate.score_mixture(backend, tokens, kn, 1.0, **how)
    assert only_model["nats_per_token"] == pytest.approx(evaluate.score_stream(backend, tokens, **how)
                                                         ["nats_per_token"], rel=1e-12)
    _, targets, _ = evaluate.scored_nll(backend, tokens, **how)
    only_ngram = evaluate.score_mixture(backend, tokens, kn, 0.0, **how)
    assert only_ngram["nats_per_token"] == pytest.approx(-np.log(kn.probs(tokens)[targets]).mean(), rel=1e-12)


def test_bad_layouts_are_one_line_errors():
    backend = NumpyBackend(random_params(5, 8))
    for how in ({"pieces": -1}, {"warmup": -3}, {"max_tokens": -1}):
        with pytest.raises(RnnlabError, match="pieces|max_tokens"):
            evaluate.score_stream(backend, np.arange(5) % 5, **how)


# ---- every backend path scores a batch ----

TORCH_PATHS = {"fused": ({}, "fused"), "autograd": ({"cell": "lstm", "num_layers": 2, "embed_size": 4}, "autograd"),
               "compile": ({"cell": "gru"}, "compile"), "nn": ({"cell": "lstm", "cell_variant": "nn"}, "nn")}


@pytest.mark.parametrize("path", [*TORCH_PATHS, "jax"])
def test_batched_scoring_agrees_with_numpy(path):
    """A batch of pieces equals the numpy reference's, float64, on every path: each row is its own stream."""
    arch, impl = TORCH_PATHS.get(path, ({"cell": "gru", "num_layers": 2}, None))
    pytest.importorskip("jax" if path == "jax" else "torch")
    params = random_params(6, 7, np.float64, scale=0.4, **arch)
    ref, fast = NumpyBackend(params), make_backend(path if path == "jax" else "torch", params, torch_impl=impl
                                                  or "auto")
    assert fast.name in (path, f"torch-{path}")
    tokens = np.random.default_rng(4).integers(0, 6, 500)
    a = evaluate.stream_nll(ref, tokens, chunk=40, pieces=5, warmup=12)
    b = evaluate.stream_nll(fast, tokens, chunk=200, pieces=5, warmup=12)
    np.testing.assert_allclose(b, a, rtol=1e-10)
    X, Y = tokens[:90].reshape(3, 30), tokens[1:91].reshape(3, 30)
    rows = [fast.token_nll(X[k:k + 1], Y[k:k + 1], fast.begin_state(1))[0] for k in range(3)]
    batched = fast.token_nll(X, Y, fast.begin_state(3))[0].reshape(30, 3).T
    np.testing.assert_allclose(batched, np.stack(rows), rtol=1e-10)


def test_the_fused_path_scores_with_its_bf16_matmuls():
    torch = pytest.importorskip("torch")
    from rnnlab.backends.torch_fused import TorchFusedBackend
    params = random_params(28, 64, np.float32, scale=0.2)
    exact, low = TorchFusedBackend(params), TorchFusedBackend(params, matmul_dtype=torch.bfloat16)
    assert_bf16_scoring(exact, low, np.random.default_rng(5).integers(0, 28, 300))
    X = np.random.default_rng(6).integers(0, 28, (4, 35))
    low.loss_and_grads(X, X, low.begin_state(4))          # training reuses the buffers scoring filled
    low.token_nll(X, X, low.begin_state(4))
    low.loss_and_grads(X, X, low.begin_state(4))


# ---- training and `rnnlab eval` say how they scored ----

@pytest.mark.usefixtures("needs_corpora")
def test_training_caps_its_evaluations_and_scores_the_whole_split_last():
    run = train.new_run(DataConfig(max_tokens=300), ModelConfig(num_hiddens=8),
                        TrainConfig(num_epochs=2, log_every=1, batch_size=4, num_steps=5, backend="numpy",
                                    eval_batch=4, eval_warmup=32, val_max_tokens=1000, num_preds=0))
    first, last = train.fit(run, progress=False, log=lambda line: None)
    whole = len(run.dataset.val) - 1
    assert 1000 - 4 <= first["val_tokens"] <= 1000 and last["val_tokens"] == whole
    for r in (first, last):
        assert r["val_scoring"] == {"pieces": 4, "warmup": 32, "matmul_dtype": "float32", "stream_tokens": whole}
    again = evaluate.score_stream(run.backend, run.dataset.val, pieces=4, warmup=32)
    assert math.isclose(again["perplexity"], last["val_ppl"], rel_tol=1e-12)
    # the best model is chosen on the capped part, the last evaluation's included
    capped = evaluate.score_stream(run.backend, run.dataset.val, pieces=4, warmup=32, max_tokens=1000)
    assert math.isclose(run.best_val_nats, min(capped["nats_per_token"], math.log(first["val_ppl"])),
                        rel_tol=1e-9)


@pytest.mark.usefixtures("needs_corpora")
def test_eval_flags_reproduce_a_training_evaluation(tmp_path):
    how = ["--eval-batch", "3", "--eval-warmup", "20", "--val-max-tokens", "600"]
    code, out, err = run_cli("train", "--num-hiddens", "8", "--batch-size", "4", "--num-steps", "5", "--max-tokens",
                          "300", "--num-epochs", "1", "--backend", "numpy", "--quiet", "--out", tmp_path / "run",
                          "--json", *how)
    assert code == 0, err
    final = json.loads(out)
    assert final["val_scoring"]["pieces"] == 3 and final["val_tokens"] == final["val_scoring"]["stream_tokens"]
    code, out, err = run_cli("eval", "--checkpoint", tmp_path / "run", "--backend", "numpy", "--json", *how[:4])
    assert code == 0, err
    again = json.loads(out)
    assert again["tokens"] == final["val_tokens"] and again["scoring"] == final["val_scoring"]
    assert math.isclose(again["perplexity"], final["val_ppl"], rel_tol=1e-6)
    code, out, err = run_cli("eval", "--checkpoint", tmp_path / "run", "--backend", "numpy", *how)
    assert code == 0, err
    assert "scored as 3 pieces side by side" in out and f"of {final['val_tokens']:,} characters" in out
    code, out, err = run_cli("eval", "--checkpoint", tmp_path / "run", "--backend", "numpy", "--json")
    exact = json.loads(out)
    assert exact["scoring"]["pieces"] == 1 and exact["tokens"] == final["val_tokens"]    # the default: exact
    assert math.isclose(exact["perplexity"], final["val_ppl"], rel_tol=1e-2)
    for bad, fragment in ((["--eval-batch", "-1"], "--eval-batch"), (["--val-max-tokens", "-5"], "--val-max-tokens"),
                          (["--dynamic-lr", "0.1", "--eval-batch", "4"], "one stream"),
                          (["--matmul-dtype", "bfloat16"], "numpy backend")):
        code, out, err = run_cli("eval", "--checkpoint", tmp_path / "run", "--backend", "numpy", *bad)
        assert code != 0 and len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.usefixtures("needs_corpora")
def test_a_resumed_run_keeps_how_its_held_out_figures_are_taken(tmp_path):
    """The best model is chosen by comparing evaluations: resuming with another layout or cap is refused."""
    tiny = ["--num-hiddens", "8", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "300", "--backend",
            "numpy", "--num-preds", "0", "--val-max-tokens", "300", "--out", tmp_path / "run", "--quiet"]
    code, out, err = run_cli("train", *tiny, "--num-epochs", "1")
    assert code == 0, err
    for changed in (["--val-max-tokens", "0"], ["--eval-batch", "4"], ["--eval-warmup", "8"]):
        code, out, err = run_cli("train", *tiny, "--num-epochs", "2", "--resume", *changed)
        assert code == 1 and f"{changed[0]} differs from the checkpoint" in err, err


def test_the_columns_a_cap_allows_are_the_most_that_count_at_most_it():
    """Layout.columns, computed per piece, against counting every (row, column) of the layout."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, K, W = int(rng.integers(2, 2000)), int(rng.integers(1, 40)), int(rng.integers(0, 100))
        layout, cap = evaluate.plan(n, K, W), int(rng.integers(1, n + 5))
        M = int(layout.lengths.max())
        per_column = layout.counted(np.arange(M)[None, :]).sum(axis=0)          # (M,)
        wanted = M if cap >= n else int(np.searchsorted(np.cumsum(per_column), cap, side="right"))
        assert layout.columns(cap) == wanted, (n, K, W, cap)
