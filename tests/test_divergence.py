"""Divergence never reaches a checkpoint: non-finite losses, gradients, weights or optimizer buffers, and a
finite loss far above its running level, stop the run with the last good checkpoint intact, or, with
--on-divergence rollback, send it back there with a smaller learning rate. Plotting never kills a run."""
import dataclasses
import json
import math

import numpy as np
import pytest

from rnnlab import checkpoint, cli, optim, rundir, sweep, train
from rnnlab.config import DataConfig, ModelConfig, TrainConfig

from conftest import DATA

DATA_CFG, MODEL = DataConfig(max_tokens=400), ModelConfig(num_hiddens=8)
BASE = TrainConfig(batch_size=4, num_steps=5, num_epochs=3, log_every=1, backend="numpy", num_preds=3)
# the step schedule multiplies the learning rate by 1e30 after the first epoch: the weights blow up
BLOW_UP = dict(lr=0.5, schedule="step", lr_step_size=1, lr_gamma=1e30, theta=0.0)
# too large a learning rate: the loss jumps in epoch 4, and half of it trains on
UNSTABLE = dict(lr=5.0, theta=3.0)


@pytest.fixture(autouse=True)
def needs_corpus():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


def fit(out=None, **changes):
    run = train.new_run(DATA_CFG, MODEL, dataclasses.replace(BASE, **changes))
    lines = []
    try:
        train.fit(run, out, progress=False, log=lines.append)
    finally:
        run.log_lines = lines
    return run


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    with pytest.raises(train.Diverged, match="diverged in epoch 2") as info:
        fit(tmp_path, **BLOW_UP)
    assert "stays at epoch 1" in str(info.value)
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.epoch == 1 and all(np.isfinite(p).all() for p in ckpt.params.values())
    assert [r["epoch"] for r in train.read_metrics(tmp_path)] == [1]


def test_the_last_update_of_an_epoch_making_weights_nan_is_caught(monkeypatch):
    """The epoch's loss is computed before each update, so only a check of the weights sees this."""
    real_step = optim.Optimizer.step
    calls = []

    def poisoned_last_step(self, params, grads, lr):
        new = real_step(self, params, grads, lr)
        calls.append(1)
        if len(calls) == 19:                      # the last minibatch of the first epoch
            new["W_hh"][0, 0] = np.nan
        return new

    monkeypatch.setattr(optim.Optimizer, "step", poisoned_last_step)
    with pytest.raises(train.Diverged, match="weights are not finite"):
        fit(num_epochs=1)
    assert len(calls) == 19


def test_a_finite_loss_far_above_its_level_is_divergence(tmp_path):
    with pytest.raises(train.Diverged, match="far above its running level"):
        fit(tmp_path, lr=1e6, theta=0.0)
    assert not checkpoint.exists(tmp_path)


def test_non_finite_optimizer_buffers_are_divergence(monkeypatch):
    real_update = optim.Adam.update

    def overflowing(self, name, p, g, lr):
        new = real_update(self, name, p, g, lr)
        if self.t == 3:
            self.state["v"][name] = np.full_like(self.state["v"][name], np.inf)
        return new

    monkeypatch.setattr(optim.Adam, "update", overflowing)
    with pytest.raises(train.Diverged, match="running averages are not finite"):
        fit(optimizer="adam", lr=0.01, num_epochs=1)


def test_rollback_goes_back_halves_the_learning_rate_and_records_it(tmp_path):
    run = fit(tmp_path, on_divergence="rollback", **UNSTABLE, num_epochs=4)
    assert run.epoch == 4 and run.rollbacks == 1 and run.lr_scale == 0.5
    records = train.read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[3]["rollbacks"] == [{"diverged_in_epoch": 4, "reason": records[3]["rollbacks"][0]["reason"],
                                        "back_to_epoch": 3, "back_to_step": 3 * 19, "lr_scale": 0.5}]
    assert "far above its running level" in records[3]["rollbacks"][0]["reason"]
    assert records[3]["lr"] == 0.5 * 5.0 and records[2]["lr"] == 5.0
    assert any("back to epoch 3" in line for line in run.log_lines)
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.extra["lr_scale"] == run.lr_scale and all(np.isfinite(p).all() for p in ckpt.params.values())


def test_rollback_gives_up_after_the_limit():
    with pytest.raises(train.Diverged, match=f"after {train.MAX_ROLLBACKS} rollbacks"):
        fit(on_divergence="rollback", lr=1e12, theta=0.0, num_epochs=2)


def test_a_rolled_back_run_resumes_exactly(tmp_path):
    straight = fit(tmp_path / "straight", on_divergence="rollback", **UNSTABLE, num_epochs=5)
    fit(tmp_path / "split", on_divergence="rollback", **UNSTABLE, num_epochs=4)
    resumed = train.resume_run(tmp_path / "split", train={"num_epochs": 5})
    train.fit(resumed, tmp_path / "split", progress=False, log=lambda s: None)
    a, b = straight.backend.numpy_params(), resumed.backend.numpy_params()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert resumed.lr_scale == straight.lr_scale


def test_the_cli_stops_with_one_line(capsys, tmp_path):
    argv = ["train", "--num-hiddens", "8", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "400",
            "--num-epochs", "3", "--log-every", "1", "--backend", "numpy", "--quiet", "--out", str(tmp_path),
            "--lr", "0.5", "--schedule", "step", "--lr-step-size", "1", "--lr-gamma", "1e30", "--clip", "0"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("rnnlab train: error: training "
                                                                              "diverged in epoch 2")
    assert checkpoint.load(tmp_path).epoch == 1


def test_sweep_labels_a_finite_divergence_as_diverged(tmp_path):
    rows = sweep.sweep(DATA_CFG, MODEL, dataclasses.replace(BASE, lr=1e6), tmp_path, budget=5,
                       names=("no clipping",), log=lambda s: None)
    assert rows[0]["status"].startswith("diverged in epoch 1")


def test_a_plot_that_fails_never_kills_the_run(tmp_path, monkeypatch):
    from rnnlab import plots

    def broken(*args, **kwargs):
        raise ValueError("no plot today")

    monkeypatch.setattr(plots, "plot_perplexity", broken)
    run = fit(tmp_path, num_epochs=3)
    assert run.epoch == 3 and checkpoint.load(tmp_path).epoch == 3
    warnings = [line for line in run.log_lines if "could not draw" in line]
    assert len(warnings) == 1 and "no plot today" in warnings[0]


@pytest.mark.parametrize("name", ["a $x^$ b.txt", "a $\\frac$.txt"])
def test_a_corpus_path_with_mathtext_still_plots(tmp_path, name):
    corpus = tmp_path / name
    corpus.write_text((DATA / "timemachine.txt").read_text()[:20000])
    run = train.new_run(DataConfig(corpus=str(corpus), max_tokens=400), MODEL, dataclasses.replace(BASE, num_epochs=1))
    lines = []
    train.fit(run, tmp_path / "run", progress=False, log=lines.append)
    assert (tmp_path / "run" / "perplexity.png").read_bytes().startswith(b"\x89PNG")
    assert not [line for line in lines if "could not draw" in line]


def test_huge_and_missing_perplexities_plot(tmp_path):
    from rnnlab.plots import plot_perplexity
    records = [{"epoch": 1, "train_ppl": None, "val_ppl": 1e300}, {"epoch": 2, "train_ppl": 3.0, "val_ppl": 1.7e308},
               {"epoch": 3, "train_ppl": 2.0, "val_ppl": 5.0}]
    plot_perplexity(records, tmp_path / "p.png", title="bad \udcff name $")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_metrics_are_strict_json(tmp_path):
    """A record whose held-out perplexity overflowed is written with null, never Infinity."""
    run = fit(num_epochs=1)
    with rundir.RunWriter(tmp_path) as writer:
        writer.save(train.make_checkpoint(run), [{**run.records[-1], "val_ppl": math.inf}], best=False)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))["val_ppl"] is None
