"""Data parallelism: ranks started by torchrun on this CPU (gloo) train the same model as one process with the
same global batch, resume at another world size, and refuse what they cannot share with one line, not a hang."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from rnnlab import distributed, train  # noqa: E402
from rnnlab.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from rnnlab.errors import RnnlabError  # noqa: E402

from conftest import DATA  # noqa: E402

LAUNCH_TIMEOUT = 120        # a launch that takes longer than this has hung
TINY = ["--num-hiddens", "24", "--batch-size", "4", "--num-steps", "6", "--max-tokens", "1500", "--log-every", "1"]
# A GRU with dropout and clipping that fires, float64: every part of a step that the ranks split or share
GRU = [*TINY, "--cell", "gru", "--num-layers", "2", "--dropout", "0.2", "--clip", "0.1", "--num-epochs", "2",
       "--backend", "torch", "--dtype", "float64", "--quiet"]

# Train through the library as each rank: new or resumed, up to a step or to the end.
SCRIPT = """
import sys
from rnnlab import distributed, train
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
mode, out, stop, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
world = distributed.init()
try:
    if mode == "new":
        run = train.new_run(DataConfig(max_tokens=1500), ModelConfig(num_hiddens=24),
                            TrainConfig(batch_size=4, num_steps=6, num_epochs=2, log_every=1, backend=backend,
                                        dtype="float64", theta=0.1, num_preds=5))
        run.world = world
    else:
        run = train.resume_run(out, world=world)
    train.fit(run, out=out, progress=False, stop_at_step=stop or None)
finally:
    distributed.shutdown(world)
"""


pytestmark = pytest.mark.usefixtures("needs_corpora")


def torchrun(cwd: Path, *args: str, ranks: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node RANKS args...` in `cwd`, bounded in time."""
    environ = {**os.environ, "RNNLAB_DATA": str(DATA), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)


def weights(out: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(next(out.glob("weights-*.safetensors")))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, rel: float = 1e-10) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["train_ppl"] == pytest.approx(y["train_ppl"], rel=rel)
        assert x["val_ppl"] == pytest.approx(y["val_ppl"], rel=rel)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=rel, atol=1e-12, err_msg=name)


def test_two_ranks_train_what_one_process_trains(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m rnnlab train`: the loss curve and the final weights of one process with
    the same global batch, to float64 rounding; rank 0 alone prints and writes."""
    from rnnlab import cli
    done = torchrun(tmp_path, "-m", "rnnlab", "train", *GRU, "--out", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("saving to two") == 1 and "2 ranks of 2 rows each (gloo)" in done.stderr
    assert cli.main(["train", *GRU, "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    def kinds(out):              # the files of a run directory, less the weights' content hash in their names
        return sorted(p.name.rsplit("-", 1)[0] if p.name.startswith("weights-") else p.name for p in out.iterdir())
    assert kinds(tmp_path / "two") == kinds(tmp_path / "one")


def test_a_run_resumes_mid_epoch_at_another_world_size(tmp_path):
    """Two ranks stop mid-epoch (the carried state of all B rows gathered into the checkpoint); one process
    resumes and ends where an uninterrupted run ends. And the other way round: one process stops, two
    ranks finish. The numpy reference trains, its gradients averaged through gloo."""
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    done = torchrun(tmp_path, str(script), "new", "two-then-one", "7", "numpy")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "two-then-one" / "checkpoint.json").read_text())
    assert saved["position"]["batch"] > 0 and saved["position"]["carried_state"]
    train.fit(train.resume_run(tmp_path / "two-then-one"), out=tmp_path / "two-then-one", progress=False)

    data, model = DataConfig(max_tokens=1500), ModelConfig(num_hiddens=24)
    cfg = TrainConfig(batch_size=4, num_steps=6, num_epochs=2, log_every=1, backend="numpy", dtype="float64",
                      theta=0.1, num_preds=5)
    train.fit(train.new_run(data, model, cfg), out=tmp_path / "straight", progress=False)
    assert_same_run(tmp_path / "two-then-one", tmp_path / "straight")

    train.fit(train.new_run(data, model, cfg), out=tmp_path / "one-then-two", progress=False, stop_at_step=7)
    done = torchrun(tmp_path, str(script), "resume", "one-then-two", "0", "numpy")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "one-then-two", tmp_path / "straight")


def test_a_batch_the_ranks_cannot_share_is_one_line(tmp_path):
    done = torchrun(tmp_path, "-m", "rnnlab", "train", *TINY, "--batch-size", "3", "--num-epochs", "1",
                    "--backend", "numpy", "--out", "odd")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("rnnlab train: error:")]
    assert errors == ["rnnlab train: error: --batch-size 3 does not divide among 2 ranks: give a multiple of 2 "
                      "(each rank trains batch_size / 2 rows of every minibatch)"]
    assert not (tmp_path / "odd").exists()


# `rnnlab train` as each rank, with flags that depend on the rank
CLI_SCRIPT = """
import os, sys
from rnnlab import cli
odd = sys.argv[2:] if os.environ["RANK"] == "1" else []
sys.exit(cli.main(["train", *TINY, "--num-epochs", "1", "--backend", "numpy", "--quiet", "--out", sys.argv[1], *odd]))
"""


@pytest.mark.parametrize("odd, said", [
    (["--lr", "2"], "rnnlab train: error: the ranks' settings differ: rank 1 has another --lr than rank 0"),
    (["--extra-text", "war_of_the_worlds"],
     "rnnlab train: error: the ranks' settings differ: rank 1 has another the extra text, "),
    (["--corpus", "no-such-file.txt"], "rnnlab train: error: rank 1: "),
    (["--data", "no-such-dir"], "rnnlab train: error: rank 1: "),     # read while the settings are resolved
])
def test_ranks_given_different_settings_or_failing_alone_stop_together(tmp_path, odd, said):
    """Rank 1 given another learning rate: every rank stops, rank 0 names the setting. Rank 1 alone unable
    to read its corpus: rank 0 says so for it, once, and nobody waits for it."""
    script = tmp_path / "odd_rank.py"
    script.write_text(f"TINY = {TINY!r}\n" + CLI_SCRIPT)
    done = torchrun(tmp_path, str(script), "out", *odd)
    errors = [line for line in done.stderr.splitlines() if line.startswith("rnnlab train: error:")]
    assert done.returncode != 0 and len(errors) == 1 and errors[0].startswith(said), done.stderr[-2000:]
    assert not (tmp_path / "out" / "checkpoint.json").exists()


def test_alone_every_collective_is_the_identity():
    world = distributed.ALONE
    grads = {"W": np.arange(6.0).reshape(2, 3)}
    loss, same = world.mean(2.5, grads)
    assert loss == 2.5 and same is grads
    assert world.any(True, False) == (True, False)
    assert world.rows(32) == slice(0, 32) and world.main and not world.distributed
    with pytest.raises(RnnlabError, match="boom"):
        world.agree("boom")


def test_the_rows_of_each_rank_cover_the_batch_once():
    rows = [distributed.World(rank, 4, rank).rows(32) for rank in range(4)]
    assert [list(range(32))[r] for r in rows] == [list(range(8 * k, 8 * k + 8)) for k in range(4)]
    with pytest.raises(RnnlabError, match="does not divide among 4 ranks"):
        distributed.check(distributed.World(1, 4, 1), 30, "numpy")
    with pytest.raises(RnnlabError, match="JAX port runs in one process"):
        distributed.check(distributed.World(1, 2, 1), 32, "jax")
