"""Training runs: exact resume, honest held-out split, stream scoring, run-directory contents."""
import dataclasses
import json

import numpy as np
import pytest

from helpers import random_params
from rnnlab import cells, evaluate, network, ngram, optim, rundir, train
from rnnlab.backends.numpy_backend import NumpyBackend
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError

SMALL = dict(data=DataConfig(max_tokens=800), model=ModelConfig(num_hiddens=16),
             train=TrainConfig(batch_size=4, num_steps=5, num_epochs=6, log_every=2, backend="numpy",
                               prefixes=("time",), num_preds=5))


def run_with(backend="numpy", sampling="sequential", **train_overrides):
    t = dataclasses.replace(SMALL["train"], backend=backend, sampling=sampling, **train_overrides)
    return train.new_run(SMALL["data"], SMALL["model"], t)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_resume_is_bit_identical(tmp_path, backend, sampling):
    if backend == "torch":
        pytest.importorskip("torch")
    straight = run_with(backend, sampling)
    train.fit(straight, tmp_path / "straight", progress=False, log=lambda s: None)

    half = run_with(backend, sampling, num_epochs=3)
    train.fit(half, tmp_path / "resumed", progress=False, log=lambda s: None)
    resumed = train.resume_run(tmp_path / "resumed", train={"num_epochs": 6})
    assert resumed.epoch == 3
    records = train.fit(resumed, tmp_path / "resumed", progress=False, log=lambda s: None)

    a, b = straight.backend.numpy_params(), resumed.backend.numpy_params()
    for name in cells.PARAM_NAMES:
        assert np.array_equal(a[name], b[name]), name          # bit-identical, not just close
    assert [r["epoch"] for r in records] == [2, 3, 4, 6]       # the resumed run logs 3 (end of part one)
    straight_metrics = train.read_metrics(tmp_path / "straight")
    assert straight_metrics[-1]["val_ppl"] == records[-1]["val_ppl"]


def test_held_out_split_is_independent_of_max_tokens():
    full = train.load_dataset(DataConfig(max_tokens=-1))
    book = train.load_dataset(DataConfig(max_tokens=10_000))
    assert len(book.train) == 10_000 and len(full.train) + len(full.val) == 170_580
    assert len(full.val) == 17_058
    np.testing.assert_array_equal(book.val, full.val)          # the held-out text never moves
    np.testing.assert_array_equal(book.train, full.train[:10_000])


def test_split_rejects_too_small_held_out():
    with pytest.raises(RnnlabError, match="held-out"):
        evaluate.split(np.arange(10), 0.1)


def test_stream_score_is_token_weighted_and_chunk_independent():
    backend = NumpyBackend(random_params(5, 8, scale=0.4))
    tokens = np.random.default_rng(0).integers(0, 5, 101)
    # reference: the whole stream in one forward pass from a zero state
    logits, _, _ = backend.forward(tokens[None, :-1], backend.begin_state(1))
    nll, _ = cells.cross_entropy(logits, tokens[1:])
    for chunk in (1, 7, 33, 500):   # uneven last chunks: a mean of per-chunk means would differ
        r = evaluate.score_stream(backend, tokens, chunk)
        assert r["tokens"] == 100
        assert r["nats_per_token"] == pytest.approx(nll.mean(), rel=1e-12)
        assert r["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-12)
        assert r["bits_per_token"] == pytest.approx(nll.mean() / np.log(2), rel=1e-12)


def test_stream_nll_is_per_token_and_sums_to_the_score():
    backend = NumpyBackend(random_params(5, 8, scale=0.4))
    tokens = np.random.default_rng(0).integers(0, 5, 77)
    logits, _, _ = backend.forward(tokens[None, :-1], backend.begin_state(1))
    nll, _ = cells.cross_entropy(logits, tokens[1:])
    for chunk in (1, 10, 100):
        np.testing.assert_allclose(evaluate.stream_nll(backend, tokens, chunk), nll, rtol=1e-12)


def test_mixture_with_an_ngram():
    rng = np.random.default_rng(6)
    train_text, tokens = rng.integers(0, 5, 400), rng.integers(0, 5, 120)
    backend = NumpyBackend(random_params(5, 8, scale=0.4))
    kn = ngram.KneserNey(3, 5).fit(train_text)
    model, counts = evaluate.score_stream(backend, tokens), kn.score(tokens)
    only_model = evaluate.score_mixture(backend, tokens, kn, 1.0)
    only_ngram = evaluate.score_mixture(backend, tokens, kn, 0.0)
    assert only_model["nats_per_token"] == pytest.approx(model["nats_per_token"], rel=1e-12)
    assert only_ngram["nats_per_token"] == pytest.approx(counts["nats_per_token"], rel=1e-12)
    assert only_model["model_perplexity"] == pytest.approx(model["perplexity"], rel=1e-12)
    assert only_model["ngram_perplexity"] == pytest.approx(counts["perplexity"], rel=1e-12)
    for w in (0.2, 0.5, 0.9):     # Jensen: the mixture's loss is at most the weighted mean of the two losses
        mixed = evaluate.score_mixture(backend, tokens, kn, w)["nats_per_token"]
        assert mixed < w * model["nats_per_token"] + (1 - w) * counts["nats_per_token"]
    with pytest.raises(RnnlabError, match="mixture weight"):
        evaluate.score_mixture(backend, tokens, kn, 1.5)


def test_dynamic_evaluation_with_full_decay_is_static_scoring():
    # decay=1 puts the trained weights back after every step: each segment is scored as in static scoring
    params = random_params(5, 8, scale=0.4)
    tokens = np.random.default_rng(0).integers(0, 5, 101)
    static = evaluate.score_stream(NumpyBackend(params), tokens, chunk=16)
    backend = NumpyBackend(params)
    dynamic = evaluate.score_stream_dynamic(backend, tokens, lr=0.5, num_steps=16, decay=1.0)
    assert dynamic["nats_per_token"] == pytest.approx(static["nats_per_token"], rel=1e-12)
    for k in params:
        np.testing.assert_allclose(backend.params[k], params[k], rtol=0, atol=1e-15)


def test_dynamic_evaluation_mixed_with_an_ngram():
    """The dynamic stream's per-token NLL is mixed with the n-gram's probabilities of the same targets: at
    weight 1 it is dynamic evaluation alone, at weight 0 the n-gram alone."""
    params = random_params(5, 8, scale=0.4)
    rng = np.random.default_rng(7)
    tokens, kn = rng.integers(0, 5, 90), ngram.KneserNey(3, 5).fit(rng.integers(0, 5, 400))
    alone = evaluate.score_stream_dynamic(NumpyBackend(params), tokens, lr=0.3, num_steps=16)
    only_model = evaluate.score_stream_dynamic(NumpyBackend(params), tokens, 0.3, 16, ngram_model=kn, weight=1.0)
    only_ngram = evaluate.score_stream_dynamic(NumpyBackend(params), tokens, 0.3, 16, ngram_model=kn, weight=0.0)
    assert only_model["nats_per_token"] == pytest.approx(alone["nats_per_token"], rel=1e-12)
    assert only_ngram["nats_per_token"] == pytest.approx(kn.score(tokens)["nats_per_token"], rel=1e-12)
    assert only_model["model_perplexity"] == pytest.approx(alone["perplexity"], rel=1e-12)
    mixed = evaluate.score_stream_dynamic(NumpyBackend(params), tokens, 0.3, 16, ngram_model=kn, weight=0.5)
    assert mixed["nats_per_token"] < 0.5 * (alone["nats_per_token"] + only_ngram["nats_per_token"])
    with pytest.raises(RnnlabError, match="mixture weight"):
        evaluate.score_stream_dynamic(NumpyBackend(params), tokens, 0.3, 16, ngram_model=kn, weight=-0.5)


def test_gradient_ms_is_the_mean_square_of_each_segments_gradient():
    params = random_params(5, 8, scale=0.4)
    tokens = np.random.default_rng(2).integers(0, 5, 61)
    ms = evaluate.gradient_ms(NumpyBackend(params), tokens, num_steps=25, max_tokens=50)
    ref, kept = NumpyBackend(params), tokens[-51:]            # the last 50 targets, in segments 25 + 25
    _, g1, state = ref.loss_and_grads(kept[None, :25], kept[None, 1:26], ref.begin_state(1))
    _, g2, _ = ref.loss_and_grads(kept[None, 25:50], kept[None, 26:51], state)
    for k in params:
        np.testing.assert_allclose(ms[k], (g1[k] ** 2 + g2[k] ** 2) / 2, rtol=1e-12)


def test_dynamic_evaluation_rms_rule_by_hand():
    """The RMS rule: each weight steps by lr * grad / (sqrt(ms) + floor), unclipped, then is pulled back
    toward the trained weight by decay * sqrt(ms) / mean(sqrt(ms)), at most all the way."""
    params = random_params(5, 8, scale=0.4)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 5, 41)
    ms = {k: rng.random(v.shape) * 0.01 + 1e-4 for k, v in params.items()}
    ms["b_q"] = np.zeros_like(ms["b_q"])          # never moved by the training text: the floor bounds its step
    lr, decay = 0.01, 0.3
    result = evaluate.score_stream_dynamic(NumpyBackend(params), tokens, lr, 25, decay, ms=ms)
    ref = NumpyBackend(params)
    loss1, grads, state = ref.loss_and_grads(tokens[None, :25], tokens[None, 1:26], ref.begin_state(1))
    rms = {k: np.sqrt(v) for k, v in ms.items()}
    mean = np.concatenate([r.ravel() for r in rms.values()]).mean()
    stepped = {k: p - lr * grads[k] / (rms[k] + evaluate.RMS_FLOOR * mean) for k, p in params.items()}
    ref.update(lambda _: {k: w - np.minimum(decay * rms[k] / mean, 1.0) * (w - params[k])
                          for k, w in stepped.items()})
    nll2 = ref.token_nll(tokens[None, 25:40], tokens[None, 26:41], state)[0].sum()
    assert result["nats_per_token"] == pytest.approx((loss1 * 25 + nll2) / 40, rel=1e-10)


def test_dynamic_evaluation_scores_each_segment_before_training_on_it():
    params = random_params(5, 8, scale=0.4)
    tokens = np.random.default_rng(1).integers(0, 5, 41)
    backend = NumpyBackend(params)
    result = evaluate.score_stream_dynamic(backend, tokens, lr=0.3, num_steps=25, theta=1.0)
    # by hand: segment 1 with the trained weights, one clipped SGD step on it, segment 2 with the new weights
    ref = NumpyBackend(params)
    loss1, grads, state = ref.loss_and_grads(tokens[None, :25], tokens[None, 1:26], ref.begin_state(1))
    grads, _, _ = optim.clip(grads, 1.0)
    ref.update(lambda params: optim.sgd(params, grads, 0.3))
    nll2 = ref.token_nll(tokens[None, 25:40], tokens[None, 26:41], state)[0].sum()
    assert result["tokens"] == 40
    assert result["nats_per_token"] == pytest.approx((loss1 * 25 + nll2) / 40, rel=1e-12)
    # the second segment's update happened too, and left the weights changed
    assert any(not np.allclose(backend.params[k], ref.params[k]) for k in params)


def test_dynamic_evaluation_adapts_to_repeated_text():
    # a passage seen once is predicted better the second time: the model has trained on it while scoring
    rng = np.random.default_rng(2)
    passage = rng.integers(0, 5, 64)
    tokens = np.concatenate([passage] * 12)
    params = random_params(5, 16, scale=0.3)
    static = evaluate.score_stream(NumpyBackend(params), tokens)
    dynamic = evaluate.score_stream_dynamic(NumpyBackend(params), tokens, lr=1.0, num_steps=16)
    assert dynamic["nats_per_token"] < static["nats_per_token"] - 0.15


def test_dynamic_evaluation_single_segment_is_static():
    params = random_params(5, 8, scale=0.4)
    tokens = np.random.default_rng(3).integers(0, 5, 50)
    static = evaluate.score_stream(NumpyBackend(params), tokens)
    dynamic = evaluate.score_stream_dynamic(NumpyBackend(params), tokens, lr=1.0, num_steps=100)
    assert dynamic["nats_per_token"] == pytest.approx(static["nats_per_token"], rel=1e-12)


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=-1.0), dict(lr=1.0, num_steps=0),
                                    dict(lr=1.0, decay=-0.5)])
def test_dynamic_evaluation_rejects_bad_settings(kwargs):
    with pytest.raises(RnnlabError, match="dynamic evaluation"):
        evaluate.score_stream_dynamic(NumpyBackend(random_params()), np.arange(5) % 5, **kwargs)


def test_run_directory_contents_and_metrics(tmp_path):
    run = run_with(num_epochs=4)
    lines = []
    train.fit(run, tmp_path, progress=False, log=lines.append)
    assert len(lines) == 2 and "train ppl" in lines[0] and "val ppl" in lines[0] and "'time" in lines[0]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [2, 4]
    for r in records:
        assert {"epoch", "train_ppl", "val_ppl", "val_bpc", "tokens_per_s", "elapsed_s"} <= set(r)
        assert r["val_bpc"] == pytest.approx(np.log2(r["val_ppl"]))
        assert r["tokens_per_s"] > 0 and 0 <= r["clip_frac"] <= 1
    assert records[1]["elapsed_s"] >= records[0]["elapsed_s"]
    assert (tmp_path / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["epoch"] == 4 and meta["config"]["model"]["num_hiddens"] == 16
    assert meta["vocab"][0] == "<unk>" and len(meta["vocab"]) == 28


def test_training_lowers_perplexity():
    run = run_with(num_epochs=1)
    first = train.train_epoch(run.backend, run.dataset.train, run.train_cfg, run.rng)
    for _ in range(4):
        last = train.train_epoch(run.backend, run.dataset.train, run.train_cfg, run.rng)
    assert last.ppl < first.ppl < 28.5                          # starts near uniform over 28 symbols
    assert first.tokens > 0 and first.tokens % (4 * 5) == 0    # whole (B, T) minibatches only


def test_too_short_corpus_says_how_many_tokens(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words here")
    with pytest.raises(RnnlabError, match="needs at least 1156"):
        train.new_run(DataConfig(corpus=str(path), val_fraction=0.1), ModelConfig(), TrainConfig())


def test_a_saved_run_is_replaced_only_with_overwrite_and_only_at_the_first_save(tmp_path):
    run = run_with(num_epochs=2)
    train.fit(run, tmp_path, progress=False, log=lambda s: None)
    def files():
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before = files()
    assert tmp_path / "best" / "checkpoint.json" in before
    with pytest.raises(RnnlabError, match="already holds a run"):
        train.fit(run_with(num_epochs=2), tmp_path, progress=False, log=lambda s: None)
    assert before == files()
    with rundir.RunWriter(tmp_path, overwrite=True) as writer:     # opened, never saved: nothing changes
        assert writer.replacing
    assert before == files()
    train.fit(run_with(num_epochs=2, seed=1), tmp_path, progress=False, log=lambda s: None, overwrite=True)
    after = files()
    assert after != before and json.loads((tmp_path / "checkpoint.json").read_text())["config"]["train"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.glob("weights-*")) != sorted(p.name for p in before if
                                                                         p.name.startswith("weights-"))


class RecordingBackend:
    """A fake backend that records the state each minibatch starts from and returns a new, known one."""

    def __init__(self):
        self.params = {"w": np.zeros(1)}
        self.received, self.returned = [], []

    def begin_state(self, batch_size):
        return np.zeros((batch_size, 2))

    def update(self, fn):
        self.params = fn(self.params)

    def loss_and_grads(self, X, Y, state, masks=None, weight_masks=None):
        self.received.append(state.copy())
        new = np.full((X.shape[0], 2), float(len(self.received)))
        self.returned.append(new)
        return 1.0, {"w": np.ones(1)}, new


@pytest.mark.parametrize("sampling, state, resets", [("sequential", "auto", False), ("random", "auto", True),
                                                     ("sequential", "reset", True), ("random", "carry", False),
                                                     ("sequential", "carry", False), ("random", "reset", True)])
def test_state_handling_follows_the_book(sampling, state, resets):
    """auto keeps the book's pairs; reset with sequential minibatches is what the book's train_ch8 does with
    use_random_iter=True on the sequential iterator."""
    backend = RecordingBackend()
    cfg = TrainConfig(batch_size=3, num_steps=4, sampling=sampling, state=state, theta=0.5, lr=0.1)
    stats = train.train_epoch(backend, np.arange(200) % 7, cfg, np.random.default_rng(0))
    assert stats.steps == len(backend.received) > 2
    assert not backend.received[0].any()                       # every epoch starts from zeros
    for k in range(1, stats.steps):
        if resets:
            assert not backend.received[k].any()               # fresh state for every minibatch
        else:
            np.testing.assert_array_equal(backend.received[k], backend.returned[k - 1])   # carried
    # every step clipped the unit gradient to norm 0.5 and took an SGD step of lr * 0.5
    assert stats.clipped == stats.steps
    assert backend.params["w"][0] == pytest.approx(-0.1 * 0.5 * stats.steps)


def test_resume_refuses_changed_settings_and_keeps_token_freqs(tmp_path):
    run = run_with(num_epochs=2)
    train.fit(run, tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(RnnlabError, match="--seed differs"):
        train.resume_run(tmp_path, train={"seed": 5})
    with pytest.raises(RnnlabError, match="--num-hiddens differs"):
        train.resume_run(tmp_path, model={"num_hiddens": 8})
    resumed = train.resume_run(tmp_path, train={"num_epochs": 4, "seed": 0})   # same value: fine
    assert resumed.dataset.vocab.token_freqs == run.dataset.vocab.token_freqs
    train.fit(resumed, tmp_path, progress=False, log=lambda s: None)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["vocab_token_freqs"][0][0] == " "


def test_fit_never_clobbers_a_saved_run(tmp_path):
    train.fit(run_with(num_epochs=2), tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(RnnlabError, match="already holds a run"):
        train.fit(run_with(num_epochs=2), tmp_path, progress=False, log=lambda s: None)


def test_crash_between_metrics_and_checkpoint_loses_no_record(tmp_path, monkeypatch):
    from rnnlab import checkpoint
    run = run_with(num_epochs=4)
    real_save = checkpoint.save

    def dies_at_epoch_4(directory, ckpt):
        if ckpt.epoch == 4:
            raise KeyboardInterrupt
        return real_save(directory, ckpt)

    monkeypatch.setattr(checkpoint, "save", dies_at_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        train.fit(run, tmp_path, progress=False, log=lambda s: None)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = train.resume_run(tmp_path)
    assert resumed.epoch == 2 and [r["epoch"] for r in resumed.records] == [2]
    train.fit(resumed, tmp_path, progress=False, log=lambda s: None)
    assert [r["epoch"] for r in train.read_metrics(tmp_path)] == [2, 4]


def test_device_auto_is_the_books_try_gpu(monkeypatch):
    from rnnlab.backends import resolve_device
    assert resolve_device("auto", "numpy") == "cpu"
    assert resolve_device("cuda:1", "torch") == "cuda:1"             # given devices pass through
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "torch") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "torch") == "cuda"


def test_the_run_records_the_device_it_chose(tmp_path):
    run = run_with(num_epochs=1)
    assert run.train_cfg.device == "auto"
    train.fit(run, tmp_path, progress=False, log=lambda s: None)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["device"] == "cpu"


@pytest.mark.parametrize("locked", [False, True])
def test_dropout_masks_are_inverted_and_locked_masks_repeat_over_time(locked):
    p, L, B, T, H = 0.25, 2, 40, 6, 50
    masks = network.dropout_masks(np.random.default_rng(0), p, L, B, T, H, np.float32, locked)
    assert masks.shape == (L, T, B, H) and masks.dtype == np.float32 and masks.flags.writeable
    assert set(np.unique(masks)) == {0.0, np.float32(1 / (1 - p))}
    assert abs((masks == 0).mean() - p) < 0.03
    same_over_time = (masks == masks[:, :1]).all()
    assert same_over_time == locked
    assert not (masks[0] == masks[1]).all() and not (masks[:, :, 0] == masks[:, :, 1]).all()   # layers, rows
    assert network.dropout_masks(np.random.default_rng(0), 0.0, L, B, T, H, np.float32, locked) is None
