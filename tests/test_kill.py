"""kill -9 at many instants, inside checkpoint writes included: afterwards the run directory always loads,
its metrics are consistent with its checkpoint, and resuming it ends with the same weights and the same
best/, to the bit, as a run that was never killed.

Two kinds of instant: deterministic ones, where the training process kills itself just before or just after
its k-th file replacement (a metrics, weights, checkpoint.json or plot write) or its k-th deletion of an old
weights file; and timed ones, where the test kills the process from outside after a delay.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rnnlab import checkpoint, rundir, train

from conftest import DATA

ARGS = ["train", "--num-hiddens", "8", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "400",
        "--log-every", "1", "--backend", "numpy", "--quiet", "--num-preds", "3", "--clip", "0.1"]
EPOCHS = 3

# Runs the CLI and kills itself with SIGKILL at the chosen instant: argv = [what, k, when, *cli args],
# what in {replace, unlink}, when in {before, after}.
KILLER = """
import os, pathlib, signal, sys
what, k, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = [0]
def wrap(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls[0] == k and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped
if what == "replace":
    os.replace = wrap(os.replace)
else:
    pathlib.Path.unlink = wrap(pathlib.Path.unlink)
from rnnlab.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run that is never killed."""
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    out = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run([sys.executable, "-m", "rnnlab", *ARGS, "--num-epochs", str(EPOCHS), "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "RNNLAB_DATA": str(DATA)}, timeout=120)
    assert done.returncode == 0, done.stderr
    straight = checkpoint.load(out)
    straight.best = checkpoint.load(out / "best")
    return straight


def check_and_finish(out, straight) -> None:
    """What a kill must leave: a run that loads, metrics that match it, and a resume to the same bits."""
    if checkpoint.exists(out):
        ckpt = checkpoint.load(out)
        records, note = rundir.records_for(out, ckpt)
        assert note is None, note
        assert records[-1] == ckpt.extra["metrics"]
        assert [r["epoch"] for r in records] == list(range(1, ckpt.epoch + 1))
        run = train.resume_run(out, train={"num_epochs": EPOCHS})
    else:                                  # killed before the first checkpoint: start again in the same place
        run = train.new_run(*checkpoint.read_configs(straight)[:3])
    train.fit(run, out, progress=False, log=lambda s: None, overwrite=not checkpoint.exists(out))
    final = checkpoint.load(out)
    assert final.epoch == EPOCHS
    for name, value in straight.params.items():
        assert np.array_equal(final.params[name], value), name
    assert [r["epoch"] for r in train.read_metrics(out)] == list(range(1, EPOCHS + 1))
    assert not [p for p in out.rglob("*.tmp")]
    best = checkpoint.load(out / "best")                   # best/ agrees with the run's own history
    assert best.epoch == straight.best.epoch
    assert all(np.array_equal(best.params[k], v) for k, v in straight.best.params.items())


def run_killer(out, what, k, when):
    argv = [sys.executable, "-c", KILLER, what, str(k), when, *ARGS, "--num-epochs", str(EPOCHS), "--out", str(out)]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "RNNLAB_DATA": str(DATA)},
                          timeout=120)


# 3 evaluations write metrics, weights, checkpoint.json, best weights, best checkpoint.json and the plot:
# 18 replacements; the second and third also delete 2 old weights files each
INSTANTS = ([("replace", k, "before" if k % 2 else "after") for k in range(1, 19)]
            + [("unlink", k, when) for k in (1, 2, 3) for when in ("before", "after")])


def every_third(cases):
    """The cases, every third one in the default suite and the others marked slow (each is a process)."""
    return [c if i % 3 == 0 else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(cases)]


@pytest.mark.parametrize("what, k, when", every_third(INSTANTS))
def test_kill_inside_writes(tmp_path, straight, what, k, when):
    out = tmp_path / "run"
    done = run_killer(out, what, k, when)
    assert done.returncode == -signal.SIGKILL, done.stderr
    check_and_finish(out, straight)


@pytest.mark.parametrize("delay", [0.4, pytest.param(0.7, marks=pytest.mark.slow), 1.0,
                                   *(pytest.param(d, marks=pytest.mark.slow) for d in (1.3, 1.6)), 2.0])
def test_kill_at_a_random_instant(tmp_path, straight, delay):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "rnnlab", *ARGS, "--num-epochs", str(EPOCHS), "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RNNLAB_DATA": str(DATA)})
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=60)
    check_and_finish(out, straight)
