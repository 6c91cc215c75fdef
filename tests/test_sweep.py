"""`rnnlab sweep`: every variant differs from the base in one respect, diverged runs are reported."""
import json

import pytest

from rnnlab import cli, sweep
from rnnlab.config import DataConfig, ModelConfig, TrainConfig

TINY_DATA = DataConfig(max_tokens=400)
TINY_MODEL = ModelConfig(num_hiddens=8)
TINY_TRAIN = TrainConfig(batch_size=4, num_steps=5, num_epochs=2, log_every=1, backend="numpy")


def test_each_variant_changes_one_thing():
    base = sweep.variant_configs("base", TINY_DATA, TINY_MODEL, TINY_TRAIN, 400)
    for name in sweep.VARIANTS:
        data, model, train = sweep.variant_configs(name, TINY_DATA, TINY_MODEL, TINY_TRAIN, 400)
        diffs = [(section, f) for section, a, b in zip(("data", "model", "train"), base, (data, model, train))
                 for f in a.__dataclass_fields__ if getattr(a, f) != getattr(b, f)]
        assert len(diffs) == (0 if name == "base" else 1), (name, diffs)
    _, _, full = sweep.variant_configs(sweep.FULL_BPTT, TINY_DATA, TINY_MODEL, TINY_TRAIN, 400)
    assert full.num_steps == 79                     # (400 - 1) // (4 + 1): one minibatch is the whole epoch


def test_full_bptt_is_one_update_per_epoch():
    from rnnlab import samplers
    import numpy as np
    T = sweep.full_bptt_steps(400, 4)
    for offset_seed in range(20):
        batches = list(samplers.batches(np.arange(400), 4, T, "sequential", np.random.default_rng(offset_seed)))
        assert len(batches) == 1


def test_sweep_writes_table_json_and_plot(tmp_path, capsys):
    names = ("base", "GRU", sweep.FULL_BPTT)
    rows = sweep.sweep(TINY_DATA, TINY_MODEL, TINY_TRAIN, tmp_path, budget=5, names=names, log=lambda s: None)
    assert [r["variant"] for r in rows] == list(names)
    assert all(r["status"] == "ok" and r["epochs"] == 2 and r["val_ppl"] > 1 for r in rows)
    table = (tmp_path / "sweep.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    assert json.loads((tmp_path / "sweep.json").read_text())[1]["variant"] == "GRU"
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "gru" / "checkpoint.json").is_file()


def test_diverged_runs_are_reported_not_dropped(tmp_path):
    train = TrainConfig(batch_size=4, num_steps=5, num_epochs=3, log_every=1, backend="numpy", lr=1e10)
    model = ModelConfig(num_hiddens=8, activation="relu")
    rows = sweep.sweep(TINY_DATA, model, train, tmp_path, budget=5, names=("no clipping",), log=lambda s: None)
    assert rows[0]["status"].startswith("diverged in epoch")
    assert "diverged" in (tmp_path / "sweep.md").read_text()


def test_sweep_cli(tmp_path, capsys):
    code = cli.main(["sweep", "--out", str(tmp_path), "--budget", "5", "--variants", "base", "ReLU",
                     "--num-hiddens", "8", "--max-tokens", "400", "--batch-size", "4", "--num-steps", "5",
                     "--num-epochs", "1", "--backend", "numpy"])
    assert code == 0
    assert "| ReLU |" in (tmp_path / "sweep.md").read_text()


@pytest.mark.parametrize("argv, fragment", [(["--budget", "0"], "--budget must be positive")])
def test_sweep_bad_flags(tmp_path, capsys, argv, fragment):
    assert cli.main(["sweep", "--out", str(tmp_path), *argv]) == 1
    assert fragment in capsys.readouterr().err
