"""The run directory never loses data: no writing through links, one writer at a time, nothing but rnnlab's
own files touched, an old run replaced only once the new one has saved, temporary files of killed writers
cleaned up, and metrics always consistent with the checkpoint they belong to."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rnnlab import checkpoint, cli, rundir, sweep, train
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError

from conftest import DATA

TINY = ["--num-hiddens", "8", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "400",
        "--num-epochs", "2", "--log-every", "1", "--backend", "numpy", "--quiet", "--num-preds", "3"]


@pytest.fixture(autouse=True)
def needs_corpus():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


def train_cli(capsys, out, *extra) -> tuple[int, str]:
    code = cli.main(["train", *TINY, "--out", str(out), *map(str, extra)])
    return code, capsys.readouterr().err


def files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, links not followed (the lock file left out: it is empty)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != rundir.LOCK_FILE}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_symlinked_best_dir_is_refused_and_its_target_untouched(capsys, tmp_path, overwrite):
    victim, run = tmp_path / "victim", tmp_path / "run"
    assert train_cli(capsys, victim)[0] == 0
    assert train_cli(capsys, run)[0] == 0
    before = files(victim)
    for entry in (run / "best").iterdir():
        entry.unlink()
    (run / "best").rmdir()
    (run / "best").symlink_to(Path("..") / "victim")
    code, err = train_cli(capsys, run, *(["--overwrite"] if overwrite else []))
    assert code == 1 and "symbolic link" in one_line(err)
    assert files(victim) == before


@pytest.mark.parametrize("name", ["checkpoint.json", "metrics.jsonl", "perplexity.png"])
def test_a_symlinked_file_in_the_run_is_refused(capsys, tmp_path, name):
    run, elsewhere = tmp_path / "run", tmp_path / "precious.txt"
    assert train_cli(capsys, run, "--num-epochs", "1")[0] == 0
    elsewhere.write_text("keep me")
    (run / name).unlink()
    (run / name).symlink_to(elsewhere)
    code, err = train_cli(capsys, run, "--num-epochs", "2", "--resume")
    assert code == 1 and "symbolic link" in one_line(err)
    assert elsewhere.read_text() == "keep me"


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    cfg = dict(data_cfg=DataConfig(max_tokens=400), model_cfg=ModelConfig(num_hiddens=8),
               train_cfg=TrainConfig(batch_size=4, num_steps=5, num_epochs=1, backend="numpy", num_preds=3))
    with rundir.RunWriter(tmp_path / "run"):
        with pytest.raises(RnnlabError, match="another rnnlab process is writing"):
            train.fit(train.new_run(**cfg), tmp_path / "run", progress=False, log=lambda s: None)
    train.fit(train.new_run(**cfg), tmp_path / "run", progress=False, log=lambda s: None)   # free again
    assert checkpoint.exists(tmp_path / "run")


def test_two_processes_training_into_one_directory(tmp_path):
    """The second process gets one clear line and exit 1; the first finishes its run untouched."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "rnnlab", "train", *TINY, "--out", str(out)]
    first = subprocess.Popen([*argv, "--num-epochs", "400", "--log-every", "100"], stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 60
        while not (out / rundir.LOCK_FILE).exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        _, first_err = first.communicate(timeout=300)
    assert second.returncode == 1 and "another rnnlab process is writing" in one_line(second.stderr)
    assert first.returncode == 0, first_err
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == 400


def test_a_directory_that_is_not_a_run_is_refused_and_overwrite_keeps_foreign_files(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text("my own metrics\n")
    (out / "weights-e000001-0123456789ab.safetensors").write_bytes(b"not rnnlab's")
    before = files(out)
    code, err = train_cli(capsys, out)
    assert code == 1 and "holds no rnnlab run" in one_line(err) and "notes.txt" in err
    assert files(out) == before and not (out / rundir.LOCK_FILE).exists()
    code, err = train_cli(capsys, out, "--overwrite")
    assert code == 0, err
    after = files(out)
    assert after["notes.txt"] == b"mine"
    assert after["weights-e000001-0123456789ab.safetensors"] == b"not rnnlab's"    # not content-addressed
    assert checkpoint.load(out).epoch == 2


def test_a_crash_before_the_first_save_leaves_the_old_run(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train_cli(capsys, out)[0] == 0
    before = files(out)

    def crash(run):
        raise RuntimeError("crash in the first log")

    monkeypatch.setattr(train, "samples", crash)
    with pytest.raises(RuntimeError):
        cli.main(["train", *TINY, "--out", str(out), "--overwrite", "--seed", "3"])
    assert files(out) == before
    monkeypatch.undo()
    assert train_cli(capsys, out, "--overwrite", "--seed", "3")[0] == 0
    assert json.loads((out / "checkpoint.json").read_text())["config"]["train"]["seed"] == 3
    assert len(list(out.glob("weights-*"))) == 1 and len(list((out / "best").glob("weights-*"))) == 1


def test_the_old_runs_best_goes_when_the_new_run_replaces_it(tmp_path):
    old = train.new_run(DataConfig(max_tokens=400), ModelConfig(num_hiddens=8),
                        TrainConfig(batch_size=4, num_steps=5, num_epochs=1, backend="numpy", num_preds=3))
    train.fit(old, tmp_path, progress=False, log=lambda s: None)
    new = train.new_run(DataConfig(max_tokens=400), ModelConfig(num_hiddens=8),
                        TrainConfig(batch_size=4, num_steps=5, num_epochs=1, backend="numpy", num_preds=3,
                                    seed=5))
    new.best_val_nats = -1.0           # nothing beats it: this run's first save does not write best/
    train.fit(new, tmp_path, progress=False, log=lambda s: None, overwrite=True)
    assert not (tmp_path / "best").exists()
    assert checkpoint.load(tmp_path).extra["metrics"] == train.read_metrics(tmp_path)[-1]


def test_metrics_of_a_replaced_run_are_not_taken_for_the_new_ones(tmp_path):
    """A kill between the new checkpoint and the new metrics of a replacing run leaves the old run's
    metrics beside the new checkpoint: resuming keeps only the checkpoint's own record, and says so."""
    small = dict(batch_size=4, num_steps=5, backend="numpy", num_preds=3, log_every=1)
    old = train.new_run(DataConfig(max_tokens=400), ModelConfig(num_hiddens=8), TrainConfig(num_epochs=3, **small))
    train.fit(old, tmp_path / "old", progress=False, log=lambda s: None)
    new = train.new_run(DataConfig(max_tokens=400), ModelConfig(num_hiddens=8),
                        TrainConfig(num_epochs=1, seed=4, **small))
    train.fit(new, tmp_path / "new", progress=False, log=lambda s: None)
    (tmp_path / "new" / "metrics.jsonl").write_bytes((tmp_path / "old" / "metrics.jsonl").read_bytes())
    resumed = train.resume_run(tmp_path / "new", train={"num_epochs": 2})
    assert resumed.records == [checkpoint.load(tmp_path / "new").extra["metrics"]]
    assert resumed.notes and "does not match the checkpoint" in resumed.notes[0]


def test_temporary_files_of_killed_writers_are_cleaned_on_the_next_start(capsys, tmp_path):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--num-epochs", "1")[0] == 0
    leftovers = [out / ".checkpoint.json.abc123.tmp", out / ".metrics.jsonl.x.tmp",
                 out / "best" / ".weights-e000001-0123456789ab.safetensors.q.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    (out / ".my-own.tmp").write_text("not rnnlab's")
    assert train_cli(capsys, out, "--num-epochs", "2", "--resume")[0] == 0
    assert not any(p.exists() for p in leftovers)
    assert (out / ".my-own.tmp").read_text() == "not rnnlab's"


def test_sweep_into_an_existing_directory_needs_overwrite(capsys, tmp_path):
    argv = ["sweep", "--out", str(tmp_path), "--budget", "5", "--variants", "base", "--num-hiddens", "8",
            "--max-tokens", "400", "--batch-size", "4", "--num-steps", "5", "--num-epochs", "1",
            "--backend", "numpy", "--num-preds", "3"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = files(tmp_path)
    assert cli.main(argv) == 1
    assert "pass --overwrite" in one_line(capsys.readouterr().err)
    assert files(tmp_path) == before
    assert cli.main([*argv, "--seed", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "base" / "checkpoint.json").read_text())["config"]["train"]["seed"] == 2


def test_sweep_refuses_a_directory_another_process_writes(tmp_path):
    held = rundir.lock(tmp_path)
    try:
        with pytest.raises(RnnlabError, match="another rnnlab process"):
            sweep.sweep(DataConfig(max_tokens=400), ModelConfig(num_hiddens=8), TrainConfig(), tmp_path, 1,
                        names=("base",), log=lambda s: None)
    finally:
        held.release()


def test_out_that_cannot_be_created_fails_before_training(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = train_cli(capsys, tmp_path / "file" / "sub")
    assert code == 1 and "file/sub" in one_line(err)


def test_interrupt_before_the_first_save_says_nothing_was_saved(capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "epoch_steps", interrupted)
    code, err = train_cli(capsys, tmp_path / "run", "--log-every", "10")
    assert code == 130 and "nothing was saved in" in err
    assert not checkpoint.exists(tmp_path / "run")


def test_is_own_weights_checks_the_content_hash(tmp_path):
    good = tmp_path / "w.bin"
    good.write_bytes(b"weights")
    import hashlib
    digest = hashlib.sha256(b"weights").hexdigest()[:12]
    named = tmp_path / f"weights-e000001-{digest}.safetensors"
    os.replace(good, named)
    assert checkpoint.is_own_weights(named)
    forged = tmp_path / "weights-e000001-000000000000.safetensors"
    forged.write_bytes(b"weights")
    assert not checkpoint.is_own_weights(forged)


DAMAGED_METRICS = [
    "[" * 100000,                                            # deep nesting
    '{"epoch": -1, "val_ppl": 3.0}',                          # negative epoch
    '{"epoch": true}',                                        # bool epoch
    '{"epoch": 1, "val_ppl": "high"}',                        # wrong type
    '{"epoch": 1, "val_ppl": NaN}',                           # not JSON
    '["epoch", 1]',                                           # not a record
    '{"val_ppl": 3.0}',                                       # no epoch
    '{"epoch": 1, "samples": {"a": 3}}',                      # samples must be text
    "\udcff",                                                 # not UTF-8 once written
]


@pytest.mark.parametrize("line", DAMAGED_METRICS)
def test_damaged_metrics_are_one_line_and_left_for_the_user(capsys, tmp_path, line):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--num-epochs", "1")[0] == 0
    damaged = (line + "\n").encode("utf-8", "surrogateescape")
    (out / "metrics.jsonl").write_bytes(damaged)
    code, err = train_cli(capsys, out, "--num-epochs", "2", "--resume")
    assert code == 1 and "metrics.jsonl is damaged" in one_line(err)
    assert (out / "metrics.jsonl").read_bytes() == damaged
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0          # the checkpoint itself is fine


def test_a_read_only_out_is_refused_before_training(capsys, tmp_path, monkeypatch):
    """(Root may write anywhere, so the permission answer is simulated.)"""
    out = tmp_path / "run"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    code, err = train_cli(capsys, out)
    assert code == 1 and "cannot write to --out" in one_line(err)
    assert not list(out.iterdir())


def test_a_resume_checks_memory_for_the_settings_it_changes(capsys, tmp_path):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--num-epochs", "1")[0] == 0
    code, err = train_cli(capsys, out, "--num-epochs", "2", "--resume", "--num-preds", str(10 ** 11))
    assert code == 1 and "--num-preds 100000000000 would need about" in one_line(err)


def test_an_empty_out_is_refused(capsys):
    code = cli.main(["train", *TINY, "--out", ""])
    assert code == 1 and "--out is empty" in one_line(capsys.readouterr().err)


def test_entries_of_the_wrong_kind_are_refused_before_training(capsys, tmp_path):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--num-epochs", "1")[0] == 0
    for entry in (out / "best").iterdir():
        entry.unlink()
    (out / "best").rmdir()
    (out / "best").write_text("a file")
    code, err = train_cli(capsys, out, "--num-epochs", "2", "--resume")
    assert code == 1 and "best is not a directory" in one_line(err)
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.json").mkdir()
    code, err = train_cli(capsys, other, "--overwrite")
    assert code == 1 and "checkpoint.json is not a file" in one_line(err)


def small_run(seed=0, epochs=1):
    return train.new_run(DataConfig(max_tokens=400), ModelConfig(num_hiddens=8),
                         TrainConfig(batch_size=4, num_steps=5, num_epochs=epochs, backend="numpy", num_preds=3,
                                     log_every=1, seed=seed))


def test_a_best_dir_left_behind_by_a_kill_is_repaired_on_resume(tmp_path):
    out = tmp_path / "run"
    train.fit(small_run(epochs=1), out, progress=False, log=lambda s: None)
    stale = {p.name: p.read_bytes() for p in (out / "best").iterdir()}
    resumed = train.resume_run(out, train={"num_epochs": 2})
    train.fit(resumed, out, progress=False, log=lambda s: None)
    ckpt = checkpoint.load(out)
    assert ckpt.extra["evals_since_best"] == 0 and checkpoint.load(out / "best").epoch == 2
    # a kill between the checkpoint and best/ of epoch 2 would leave the epoch-1 best/
    for entry in (out / "best").iterdir():
        entry.unlink()
    for name, blob in stale.items():
        (out / "best" / name).write_bytes(blob)
    assert checkpoint.load(out / "best").epoch == 1
    with rundir.RunWriter(out, resume_epoch=2):
        pass
    best = checkpoint.load(out / "best")
    assert best.epoch == 2 and all(np.array_equal(best.params[k], ckpt.params[k]) for k in ckpt.params)


def test_the_best_dir_of_a_replaced_run_never_stays(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    train.fit(small_run(seed=1), old, progress=False, log=lambda s: None)
    run = small_run(seed=2, epochs=2)
    run.best_val_nats = -1.0                      # no evaluation is the best: best/ is never written
    train.fit(run, new, progress=False, log=lambda s: None)
    assert not (new / "best").exists()
    shutil.copytree(old / "best", new / "best")   # as a kill inside a replacing save would leave it
    with rundir.RunWriter(new, resume_epoch=2):
        pass
    assert not (new / "best").exists()


def test_the_checkpoints_own_record_must_be_its_own(capsys, tmp_path):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--num-epochs", "1")[0] == 0
    meta = json.loads((out / "checkpoint.json").read_text())
    meta["metrics"] = {"epoch": 5}
    (out / "checkpoint.json").write_text(json.dumps(meta))
    code, err = train_cli(capsys, out, "--num-epochs", "2", "--resume")
    assert code == 1 and "corrupt checkpoint" in one_line(err) and "missing" in err


def test_an_interrupt_before_overwriting_a_directory_without_a_run_says_nothing_was_saved(capsys, tmp_path,
                                                                                         monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "epoch_steps", interrupted)
    code, err = train_cli(capsys, out, "--overwrite")
    assert code == 130 and "nothing was saved" in err and "still holds" not in err
