"""The run directory of `rnnlab train --out DIR`: what is in it, and the rules that keep it safe.

    DIR/checkpoint.json + weights-e*.safetensors   the latest checkpoint (see checkpoint.py)
    DIR/metrics.jsonl                              one JSON record per evaluation
    DIR/perplexity.png                             train and held-out perplexity per evaluation
    DIR/best/                                      the checkpoint with the best held-out loss so far
    DIR/.lock                                      locked by the one process writing into DIR

The rules:
  - One writer at a time: a process holds an exclusive lock on DIR/.lock for as long as it writes into DIR
    (released by the operating system when the process ends, even by kill -9); a second one is refused.
  - No links: rnnlab never writes, reads back or deletes through a symbolic link inside DIR (best/, a
    checkpoint, metrics); one is refused with a clear message. DIR itself may be a link: the user named it.
  - Only rnnlab's files: a directory that holds a run, or anything else, is refused unless --overwrite is
    given, and even then only the entries above are touched. A weights file is deleted only when its
    content hashes to the name it carries, i.e. when rnnlab wrote it.
  - Replacing is deferred: with --overwrite the old run stays intact until the new run first saves.
  - Metrics are written before the checkpoint, so a crash between the two leaves metrics one record ahead,
    which resuming drops; the checkpoint also holds its own last record, which resuming checks against.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from filelock import FileLock, Timeout

from . import checkpoint, schema
from .errors import RnnlabError
from .fileio import atomic_write_text, dumps_json

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "perplexity.png"
BEST_DIR = "best"
LOCK_FILE = ".lock"
OWN_FILES = (checkpoint.META_FILE, METRICS_FILE, PLOT_FILE)
WEIGHTS = re.compile(r"weights-e\d+-([0-9a-f]{12})\.safetensors")
# what fileio.atomic_write_bytes leaves behind when it is killed: .<name>.<random>.tmp
TEMP = re.compile(r"\.(checkpoint\.json|metrics\.jsonl|perplexity\.png|weights-e\d+-[0-9a-f]{12}\.safetensors)"
                  r"\.[^/]+\.tmp")


def _is_own_entry(path: Path) -> bool:
    """Whether an entry of a run directory (or of its best/) is one rnnlab writes."""
    name = path.name
    return (name in OWN_FILES or name in (BEST_DIR, LOCK_FILE) or WEIGHTS.fullmatch(name) is not None
            or TEMP.fullmatch(name) is not None)


def check_entries(out: Path) -> None:
    """Refuse a symbolic link among rnnlab's own entries of `out` and of `out/best`, and an entry of the
    wrong kind (a checkpoint.json that is a directory, a best that is a file)."""
    for folder in (out, out / BEST_DIR):
        if folder is not out and folder.is_symlink():
            raise RnnlabError(f"{folder} is a symbolic link; rnnlab never writes through a link in a run "
                              "directory: remove it (the directory it points to is left alone)")
        if folder is not out and folder.exists() and not folder.is_dir():
            raise RnnlabError(f"{folder} is not a directory; rnnlab keeps the best checkpoint there: remove it")
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_symlink() and _is_own_entry(entry):
                raise RnnlabError(f"{entry} is a symbolic link; rnnlab never writes through a link in a run "
                                  "directory: remove it")
            if entry.name in OWN_FILES and not entry.is_file():
                raise RnnlabError(f"{entry} is not a file; rnnlab writes its {entry.name} there: remove it")


def present(out: Path) -> list[str]:
    """Names in `out`, but for the lock and the temporary files of killed writers."""
    return sorted(e.name for e in out.iterdir() if e.name != LOCK_FILE and not TEMP.fullmatch(e.name))


def remove_temp_files(out: Path) -> None:
    """Delete the temporary files an earlier killed process left in `out` and `out/best` (under the lock,
    so none of them belongs to a live writer)."""
    for folder in (out, out / BEST_DIR):
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.iterdir():
                if TEMP.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                    entry.unlink(missing_ok=True)


def remove_checkpoint(folder: Path) -> None:
    """Delete the checkpoint in `folder` (checkpoint.json first, so the folder never names missing weights)
    and the weights files rnnlab wrote there; the folder itself goes if that leaves it empty."""
    if folder.is_symlink() or not folder.is_dir():
        return
    (folder / checkpoint.META_FILE).unlink(missing_ok=True)
    for entry in folder.iterdir():
        if checkpoint.is_own_weights(entry):
            entry.unlink()
    remove_temp_files(folder)
    if not any(folder.iterdir()):
        folder.rmdir()


def read_metrics(out) -> list[dict]:
    """Every record of OUT/metrics.jsonl, each checked against the record schema ([] when there is none)."""
    path = Path(out) / METRICS_FILE
    if path.is_symlink():
        raise RnnlabError(f"{path} is a symbolic link; rnnlab never reads a run's files through a link")
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_full_record(json.loads(line), f"line {i}") for i, line in enumerate(lines, 1) if line.strip()]
    except (UnicodeDecodeError, ValueError, RecursionError, RnnlabError) as e:
        raise RnnlabError(f"{path} is damaged ({e}); move it away to resume without the earlier metrics") \
            from None


RECORD_KEYS = ("epoch", "train_ppl", "val_ppl", "val_bits_per_token", "tokens_per_s", "elapsed_s", "samples")


def _full_record(r, where: str) -> dict:
    """A metrics record as the training loop writes it: the schema's types, and every key it reads back."""
    r = schema.check_record(r, where)
    missing = [k for k in RECORD_KEYS if k not in r]
    if missing:
        raise RnnlabError(f"{where}: missing {', '.join(missing)}")
    return r


def after(record: dict, epoch: int, step: int) -> bool:
    """Whether a metrics record was written after the checkpoint at (`epoch`, `step`): by its step, or for
    a record written before steps were counted, by its epoch."""
    return record["step"] > step if "step" in record else record["epoch"] > epoch


def records_for(out, ckpt: checkpoint.Checkpoint, step: int | None = None) -> tuple[list[dict], str | None]:
    """The metrics records that belong to checkpoint `ckpt` of `out` (at global step `step`, by default the
    one it records), and a note when some had to be dropped. Records after the checkpoint (written just
    before a crash) are dropped silently. If the last remaining record is not the checkpoint's own (the
    metrics of the run this one replaced, left by a crash between the new checkpoint and its metrics), only
    the checkpoint's record is kept. A damaged file is an error: the user decides what to do with it,
    nothing overwrites it."""
    step = ckpt.extra.get("step", 0) if step is None else step
    own = ckpt.extra.get("metrics")
    if own is not None:
        try:
            own = _full_record(own, "its own metrics record")
            if after(own, ckpt.epoch, step):
                raise RnnlabError(f"its own metrics record is for epoch {own['epoch']}, after the checkpoint's "
                                  f"epoch {ckpt.epoch}")
        except RnnlabError as e:
            raise RnnlabError(f"corrupt checkpoint {Path(out) / checkpoint.META_FILE}: {e}") from None
    records = [r for r in read_metrics(out) if not after(r, ckpt.epoch, step)]
    if own is None or (records and records[-1] == own):
        return records, None
    return [own], (f"{Path(out) / METRICS_FILE} does not match the checkpoint (epoch {ckpt.epoch}); keeping "
                   "only the checkpoint's own record")


def lock(folder: Path) -> FileLock:
    """Take the exclusive lock of `folder` (created if needed), or raise RnnlabError when another process
    holds it. Release it with `.release()`."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    if lock_path.is_symlink():
        raise RnnlabError(f"{lock_path} is a symbolic link; remove it")
    held = FileLock(str(lock_path), timeout=0)
    try:
        held.acquire()
    except Timeout:
        raise RnnlabError(f"another rnnlab process is writing to {folder} (it holds {lock_path}); wait for it to "
                          "finish or choose another --out") from None
    return held


class RunWriter:
    """Exclusive, checked access to a run directory for one training process.

    `open()` creates the directory, takes the lock, refuses links and foreign files, cleans up temporary
    files of killed writers and repairs best/; `save()` writes one evaluation's metrics and checkpoint;
    `close()` releases the lock. `resume_epoch` is the epoch of the checkpoint a resumed run was loaded
    from: the directory must still hold it once the lock is taken.
    """

    def __init__(self, out, overwrite: bool = False, resume_epoch: int | None = None,
                 resume_step: int | None = None):
        self.out = Path(out)
        self.overwrite, self.resume_epoch, self.resume_step = overwrite, resume_epoch, resume_step
        self.replacing = False          # rnnlab's files of an earlier run are here and go at the first save
        self.old_run = False            # ... and they include a checkpoint
        self.saved_epoch = resume_epoch  # the epoch of the checkpoint on disk that this run wrote or resumed
        self.saved_step = resume_step    # ... and its step
        self._lock = None

    def __enter__(self) -> "RunWriter":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise RnnlabError(f"--out {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise RnnlabError(f"cannot write to --out {out} (permission denied)")
        had_lock_file = (out / LOCK_FILE).exists()
        self._lock = lock(out)
        try:
            check_entries(out)
            remove_temp_files(out)
            self._check_contents()
        except BaseException:
            self.close()
            if not had_lock_file:
                (out / LOCK_FILE).unlink(missing_ok=True)     # refused: leave the directory as it was
            raise

    def _check_contents(self) -> None:
        out = self.out
        if self.resume_epoch is not None:
            ckpt = checkpoint.load(out)
            step = ckpt.extra.get("step") if self.resume_step is not None else None
            if ckpt.epoch != self.resume_epoch or step != self.resume_step:
                raise RnnlabError(f"the checkpoint in {out} moved from epoch {self.resume_epoch} to {ckpt.epoch} "
                                  "while this run was loading; another process trained it")
            repair_best(out, ckpt)
            return
        if checkpoint.exists(out):
            if not self.overwrite:
                raise RnnlabError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                                  "replace it, or choose another --out")
        elif present(out) and not self.overwrite:
            names = present(out)
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise RnnlabError(f"--out {out} is not empty and holds no rnnlab run (it has {shown}); choose an "
                              "empty or new directory, or pass --overwrite to write rnnlab's files there (no "
                              "other file is touched)")
        self.old_run = checkpoint.exists(out)
        self.replacing = any(_is_own_entry(out / name) for name in present(out))

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def save(self, ckpt: checkpoint.Checkpoint, records: list[dict], best: bool) -> None:
        """Write the metrics and the checkpoint (and, with `best`, the same checkpoint to best/).

        Within a run, metrics go first, then the checkpoint, then best/ (a kill before best/ is written
        leaves a checkpoint that names itself the best, and `repair_best` rewrites best/ from it on
        resuming). The first save of a run that replaces another writes the checkpoint first: from then on the
        directory is the new run's, and the old run's best/ goes unless this save rewrote it (a kill in
        between leaves an old best/, which `repair_best` removes on resuming)."""
        out = self.out
        check_entries(out)
        metrics = "".join(dumps_json(r) + "\n" for r in records)
        if self.replacing:
            checkpoint.save(out, ckpt)
            self.replacing, self.old_run, self.saved_epoch = False, False, ckpt.epoch
            self.saved_step = ckpt.extra.get("step")
            (out / PLOT_FILE).unlink(missing_ok=True)          # the old run's; the caller draws the new one
            atomic_write_text(out / METRICS_FILE, metrics)
            if best:
                checkpoint.save(out / BEST_DIR, ckpt)
            else:
                remove_checkpoint(out / BEST_DIR)
        else:
            atomic_write_text(out / METRICS_FILE, metrics)
            checkpoint.save(out, ckpt)
            self.saved_epoch, self.saved_step = ckpt.epoch, ckpt.extra.get("step")
            if best:
                checkpoint.save(out / BEST_DIR, ckpt)

    @property
    def plot_path(self) -> Path:
        return self.out / PLOT_FILE


def repair_best(out: Path, ckpt: checkpoint.Checkpoint) -> None:
    """Make OUT/best agree with the checkpoint `ckpt` of OUT after a kill inside a save: a best/ of another
    run (the one this run replaced) goes, and when `ckpt` is itself the best so far (no evaluation since
    the best) best/ is rewritten from it."""
    folder = out / BEST_DIR
    try:
        best = checkpoint.load(folder) if checkpoint.exists(folder) else None
    except RnnlabError:
        best = None
    if folder.is_dir() and (best is None or best.extra.get("run_id") != ckpt.extra.get("run_id")):
        remove_checkpoint(folder)
        best = None
    if ckpt.extra.get("evals_since_best") == 0 and (best is None or best.epoch != ckpt.epoch):
        checkpoint.save(folder, ckpt)
