"""Exact resume when clipping fires: every backend and optimizer gives the same bits as an uninterrupted run,
whatever order the checkpoint hands the parameters back in (a new process reads them in another order)."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from rnnlab import checkpoint, optim
from rnnlab.config import DataConfig, ModelConfig, TrainConfig

from conftest import DATA
from helpers import assert_resume_is_bit_exact

DATA_CFG = DataConfig(max_tokens=400)
BASE = TrainConfig(batch_size=4, num_steps=5, num_epochs=3, log_every=1, backend="numpy", num_preds=3,
                   theta=0.05, lr=0.5)       # theta small enough that clipping fires at every step

BACKENDS = {
    "numpy": dict(backend="numpy"),
    "torch-fused": dict(backend="torch", torch_impl="fused"),
    "torch-autograd": dict(backend="torch", torch_impl="autograd"),
    "torch-compile": dict(backend="torch", torch_impl="compile"),
}
OPTIMIZERS = {"sgd": dict(optimizer="sgd"), "momentum": dict(optimizer="momentum", lr=0.1),
              "adam": dict(optimizer="adam", lr=0.01), "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=0.1)}


@pytest.fixture(autouse=True)
def needs_corpus():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("backend", [p for name in BACKENDS for p in (
    [pytest.param(name, marks=pytest.mark.slow)] if name == "torch-compile" else [name])])
def test_resume_is_bit_exact_while_clipping_fires(tmp_path, monkeypatch, backend, optimizer):
    if backend != "numpy":
        pytest.importorskip("torch")
    cfg = dataclasses.replace(BASE, **BACKENDS[backend], **OPTIMIZERS[optimizer])
    assert_resume_is_bit_exact(tmp_path, monkeypatch, DATA_CFG, ModelConfig(num_hiddens=8), cfg)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("torch", marks=pytest.mark.slow)])
def test_resume_in_a_new_process_is_bit_exact_while_clipping_fires(tmp_path, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    argv = [sys.executable, "-m", "rnnlab", "train", "--num-hiddens", "8", "--batch-size", "4", "--num-steps",
            "5", "--max-tokens", "400", "--log-every", "1", "--backend", backend, "--quiet", "--num-preds", "3",
            "--clip", "0.05", "--optimizer", "adam", "--lr", "0.01", "--num-layers", "2", "--cell", "gru"]
    def train_cli(*extra):
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    train_cli("--num-epochs", "3", "--out", str(tmp_path / "straight"))
    train_cli("--num-epochs", "1", "--out", str(tmp_path / "split"))
    train_cli("--num-epochs", "3", "--out", str(tmp_path / "split"), "--resume")
    a, b = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "split")
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clip_frac"] > 0 for r in metrics)


def test_the_global_norm_does_not_depend_on_dict_order():
    rng = np.random.default_rng(0)
    names = ["W_xh", "W_hh", "b_h", "W_xz_l2", "W_hz_l2", "b_z_l2", "W_emb", "W_hq", "b_q"]
    grads = {n: (rng.standard_normal(rng.integers(1, 40)) * 10.0 ** rng.integers(-4, 4)).astype(np.float32)
             for n in names}
    norms = set()
    for _ in range(50):
        order = rng.permutation(names)
        norms.add(optim.grad_norm({n: grads[n] for n in order}))
    assert len(norms) == 1
