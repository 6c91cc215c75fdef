"""Runs that work from anywhere (a corpus file is known by its absolute path and its SHA-256), torch's thread
count (--threads), and one clear line for an unsupported device, a missing checkpoint and a tiny text."""
import json
import os
import shutil

import numpy as np
import pytest

from rnnlab import backends, cells, checkpoint, corpora, runstate
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError

from helpers import one_line_error, run_cli as run
from conftest import DATA  # noqa: E402  (the corpora folder: $RNNLAB_DATA or ../shared/data)

TINY = ["--num-hiddens", "8", "--batch-size", "2", "--num-steps", "5", "--max-tokens", "300",
        "--num-epochs", "1", "--log-every", "1", "--backend", "numpy", "--preprocess", "d2l", "--quiet"]


@pytest.fixture(autouse=True)
def corpora_present():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


def book_text(size: int = 3000) -> str:
    return (DATA / "timemachine.txt").read_text()[:size]


def saved_corpus(out) -> tuple[str, str]:
    """(config corpus, extra corpus_path) of the checkpoint in `out`."""
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    return meta["config"]["data"]["corpus"], meta["corpus_path"]


@pytest.fixture
def relative_run(tmp_path, monkeypatch):
    """A run trained on `a.txt` given by a relative path from tmp_path/work; the test then stands in
    tmp_path/elsewhere."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "a.txt").write_text(book_text())
    monkeypatch.chdir(work)
    code, _, err = run("train", "--corpus", "a.txt", *TINY, "--out", tmp_path / "run")
    assert code == 0, err
    monkeypatch.chdir(elsewhere)
    return tmp_path / "run", work / "a.txt"


# --- a corpus file is known by its absolute path and its SHA-256 ------------------------------------------

def test_a_run_records_its_corpus_file_by_absolute_path(relative_run):
    out, corpus = relative_run
    assert saved_corpus(out) == (str(corpus.resolve()), str(corpus.resolve()))


def test_a_run_on_a_relative_path_evaluates_and_resumes_from_another_directory(relative_run):
    out, corpus = relative_run
    code, stdout, err = run("eval", "--checkpoint", out, "--backend", "numpy", "--json")
    assert code == 0, err
    assert json.loads(stdout)["corpus"] == str(corpus.resolve())
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 2, "--quiet")
    assert code == 0, err
    code, _, err = run("baseline", "--checkpoint", out, "--order", 2)
    assert code == 0, err


def test_resume_takes_the_same_file_spelled_another_way(relative_run):
    out, corpus = relative_run
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 2, "--quiet", "--corpus", corpus)
    assert code == 0, err
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 3, "--quiet",
                       "--corpus", os.path.relpath(corpus))
    assert code == 0, err


@pytest.mark.parametrize("where", ["RNNLAB_DATA", "--data-dir", "cwd", "checkpoint"])
def test_a_moved_corpus_is_found_by_its_hash(relative_run, tmp_path, monkeypatch, where):
    out, corpus = relative_run
    dest = {"RNNLAB_DATA": tmp_path / "data", "--data-dir": tmp_path / "mine", "cwd": tmp_path / "elsewhere",
            "checkpoint": out}[where]
    dest.mkdir(exist_ok=True)
    shutil.move(corpus, dest / "a.txt")
    if where == "RNNLAB_DATA":
        monkeypatch.setenv("RNNLAB_DATA", str(dest))
    flags = ["--data-dir", dest] if where == "--data-dir" else []
    code, stdout, err = run("eval", "--checkpoint", out, "--backend", "numpy", "--json", *flags)
    assert code == 0, err
    assert json.loads(stdout)["corpus"] == str((dest / "a.txt").resolve())
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 2, "--quiet", *flags)
    assert code == 0, err
    assert saved_corpus(out) == (str((dest / "a.txt").resolve()),) * 2     # the next resume looks there first


def test_a_same_named_file_with_other_contents_is_not_taken_for_the_corpus(relative_run, tmp_path):
    out, corpus = relative_run
    corpus.rename(tmp_path / "moved.txt")
    (tmp_path / "elsewhere" / "a.txt").write_text(book_text(2500))
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 2, "--quiet")
    one_line_error(code, err, f"the corpus file {corpus.resolve()}", "is not there", "a.txt with its SHA-256",
                   str(tmp_path / "elsewhere"), "--corpus PATH")
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 2, "--quiet",
                       "--corpus", tmp_path / "moved.txt")
    assert code == 0, err


def test_a_changed_corpus_is_refused_in_one_line(relative_run):
    out, corpus = relative_run
    corpus.write_text(book_text() + "more text")
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 2, "--quiet")
    one_line_error(code, err, str(corpus.resolve()), "changed since the checkpoint was written", "--corpus PATH")
    code, _, err = run("eval", "--checkpoint", out, "--backend", "numpy")
    one_line_error(code, err, "changed since the checkpoint was written")
    code, _, err = run("train", "--resume", "--out", out, "--num-epochs", 2, "--quiet", "--corpus", corpus)
    one_line_error(code, err, f"--corpus {corpus} is not the text", "SHA-256 differs")


def test_eval_on_another_corpus_still_scores_that_text(relative_run, tmp_path):
    out, corpus = relative_run
    other = tmp_path / "other.txt"
    other.write_text(book_text(6000)[3000:])
    corpus.unlink()                                  # the model's own text is not needed to score another
    code, stdout, err = run("eval", "--checkpoint", out, "--backend", "numpy", "--json", "--corpus", other)
    assert code == 0, err
    assert json.loads(stdout)["corpus"] == str(other.resolve())


def test_a_named_corpus_stays_a_name_and_a_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(book_text())
    model, train = ModelConfig(num_hiddens=4), TrainConfig(batch_size=2, num_steps=5, backend="numpy")
    named = runstate.new_run(DataConfig(corpus="timemachine", max_tokens=300), model, train)
    assert named.data_cfg.corpus == "timemachine" and named.dataset.path.is_absolute()
    own = runstate.new_run(DataConfig(corpus="a.txt", max_tokens=300), model, train)
    assert own.data_cfg.corpus == str(tmp_path.resolve() / "a.txt") == str(own.dataset.path)


def test_find_by_hash_skips_files_with_other_contents(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "t.txt").write_text("not it")
    (second / "t.txt").write_text("the text")
    sha = corpora.sha256_file(second / "t.txt")
    assert corpora.find_by_hash(sha, "t.txt", [tmp_path / "none", first, first, second]) == second / "t.txt"
    assert corpora.find_by_hash(sha, "u.txt", [first, second]) is None


# --- threads ----------------------------------------------------------------------------------------------

@pytest.fixture
def torch_threads():
    """torch, with its thread count put back after the test."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_set_threads_sets_torch_threads(torch_threads):
    assert backends.set_threads(1, "torch", "cpu") == 1
    assert torch_threads.get_num_threads() == 1
    assert backends.set_threads(1, "numpy", "cpu") is None
    with pytest.raises(RnnlabError, match="--threads must be >= 0"):
        backends.set_threads(-1, "torch", "cpu")


def test_set_threads_does_not_apply_to_jax(torch_threads):
    pytest.importorskip("jax")
    assert backends.set_threads(1, "jax", "cpu") is None


def test_default_threads_fits_the_cpus_and_the_load(monkeypatch):
    default = backends.default_threads.__wrapped__          # uncached
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= default() <= min(cpus, backends.MAX_THREADS)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(backends, "other_runnable", lambda: 0)
    assert default() == backends.MAX_THREADS
    monkeypatch.setattr(backends, "other_runnable", lambda: 62)
    assert default() == 2
    monkeypatch.setattr(backends, "other_runnable", lambda: 500)
    assert default() == 1


def test_other_runnable_counts_the_runnable_tasks_now_not_the_load_average(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    fake = tmp_path / "loadavg"
    fake.write_text("9.50 3.00 1.00 4/321 12345\n")        # a long-past load of 9.5; 4 runnable now

    def open_(path, *args, **kwargs):
        return real_open(fake if path == "/proc/loadavg" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    assert backends.other_runnable(samples=3, interval=0) == 3              # the other three, not 9.5
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.0, 0.0), raising=False)
    assert backends.other_runnable() == 1.5


def test_a_torch_run_sets_its_threads_and_resume_may_change_them(torch_threads, tmp_path):
    (tmp_path / "a.txt").write_text(book_text())
    data = DataConfig(corpus=str(tmp_path / "a.txt"), max_tokens=300)
    train = TrainConfig(batch_size=2, num_steps=5, backend="torch", device="cpu", threads=1)
    run_ = runstate.new_run(data, ModelConfig(num_hiddens=4), train)
    assert run_.backend.threads == 1 == torch_threads.get_num_threads()
    checkpoint.save(tmp_path / "run", runstate.make_checkpoint(run_))
    resumed = runstate.resume_run(tmp_path / "run", train={"threads": 2})
    assert resumed.backend.threads == 2 == torch_threads.get_num_threads()


def test_generate_and_eval_take_threads(torch_threads, tiny_run):
    cpu = ["--backend", "torch", "--device", "cpu"]
    code, stdout, err = run("generate", "--checkpoint", tiny_run, *cpu, "--threads", 1)
    assert code == 0 and stdout.strip(), err
    assert torch_threads.get_num_threads() == 1
    torch_threads.set_num_threads(2)
    code, _, err = run("eval", "--checkpoint", tiny_run, *cpu, "--threads", 1)
    assert code == 0, err
    assert torch_threads.get_num_threads() == 1
    one_line_error(*run("generate", "--checkpoint", tiny_run, "--threads", -1)[::2], "--threads must be >= 0")
    one_line_error(*run("train", *TINY, "--threads", -1, "--out", tiny_run.parent / "neg")[::2],
                   "--threads must be a finite number >= 0")


# --- one clear line --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny numpy run on a file corpus given by its absolute path."""
    base = tmp_path_factory.mktemp("anywhere")
    code, _, err = run("train", "--corpus", DATA / "timemachine.txt", *TINY, "--out", base / "run")
    assert code == 0, err
    return base / "run"


DEVICE_COMMANDS = [(command, backend) for command in ("train", "generate", "eval", "sweep")
                   for backend in ("auto", "numpy", "torch", "jax")] + [("bench", None)]


@pytest.mark.parametrize("device", ["mps", "MPS", "cuda:x", "", "cuda:-1", " cpu", "xla"])
@pytest.mark.parametrize("command, backend", DEVICE_COMMANDS)
def test_an_unsupported_device_is_one_line_naming_the_supported_ones(tiny_run, tmp_path, command, backend,
                                                                      device):
    where = {"train": ["--out", tmp_path / "out", *TINY], "sweep": ["--out", tmp_path / "sweep"],
             "generate": ["--checkpoint", tiny_run], "eval": ["--checkpoint", tiny_run], "bench": ["--quick"]}
    argv = [command, f"--device={device}", *where[command], *(["--backend", backend] if backend else [])]
    one_line_error(*run(*argv)[::2], f"unknown device {device!r}", "cpu, cuda or cuda:N")
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweep").exists()


def test_make_backend_refuses_an_unsupported_device():
    params = cells.init_params(5, 4, np.random.default_rng(0), np.dtype(np.float32))
    for device in ("mps", "cuda:x"):
        with pytest.raises(RnnlabError, match="cpu, cuda or cuda:N"):
            backends.make_backend("auto", params, device=device)


def test_eval_split_all_scores_a_text_too_short_to_split(tiny_run, tmp_path):
    tiny = tmp_path / "tiny18.txt"
    tiny.write_text("the time traveller")
    assert len(tiny.read_text()) == 18
    code, stdout, err = run("eval", "--checkpoint", tiny_run, "--backend", "numpy", "--corpus", tiny,
                            "--split", "all", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["tokens"] == 17 and result["split"] == "all" and result["unknown_tokens"] == 0
    one_line_error(*run("eval", "--checkpoint", tiny_run, "--backend", "numpy", "--corpus", tiny)[::2],
                   "held-out")


def test_eval_split_all_is_the_whole_text(tiny_run):
    scores = {split: json.loads(run("eval", "--checkpoint", tiny_run, "--backend", "numpy", "--split", split,
                                  "--json")[1])
              for split in ("all", "val")}
    assert scores["all"]["tokens"] > 9 * scores["val"]["tokens"]


@pytest.mark.parametrize("case, reason", [("missing", "no such directory"), ("file", "not a directory"),
                                          ("empty", "it has no checkpoint.json"),
                                          ("missing-json", "no such file")])
@pytest.mark.parametrize("command", ["generate", "eval", "resume", "baseline", "init-from"])
def test_a_missing_checkpoint_names_the_path_given_and_what_is_missing(tmp_path, monkeypatch, command, case,
                                                                       reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a run")
    (tmp_path / "empty").mkdir()
    given = {"missing": "nosuch", "file": "file", "empty": "empty", "missing-json": "empty/checkpoint.json"}[case]
    argv = {"generate": ["generate", "--checkpoint", given], "eval": ["eval", "--checkpoint", given],
            "resume": ["train", "--resume", "--out", given], "baseline": ["baseline", "--checkpoint", given],
            "init-from": ["train", "--init-from", given, "--out", "new"]}[command]
    if command == "resume" and case == "missing-json":
        pytest.skip("--out names a run directory")
    line = one_line_error(*run(*argv)[::2], "no checkpoint", reason)
    assert f" {given}: " in line, line
