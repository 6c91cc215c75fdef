"""Steps, not only epochs: evaluation and checkpoints every N minibatch steps, mid-epoch checkpoints that resume
exactly (sampler position, RNG, carried state), Ctrl-C that saves the current step and says so, the default run
directory, starting from a trained model (--init-from), and the settings a resumed run may change."""
import dataclasses
import json
import os
import re
import signal

import numpy as np
import pytest

from rnnlab import checkpoint, cli, train
from rnnlab.config import DataConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError

from conftest import DATA
from helpers import sigint_as_at_a_terminal

DATA_CFG = DataConfig(max_tokens=400)
BASE = TrainConfig(batch_size=4, num_steps=5, num_epochs=2, log_every=1, backend="numpy", num_preds=3,
                   theta=0.05, lr=0.5)       # 19 minibatches an epoch; clipping fires at every step
QUIET = dict(progress=False, log=lambda s: None)
TINY = ["--num-hiddens", "8", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "400",
        "--num-epochs", "2", "--log-every", "1", "--backend", "numpy", "--quiet"]

CASES = {
    "rnn sequential (carried state)": (dict(), dict()),
    "lstm sequential, dropout and weight drop, adam, weight averaging": (
        dict(cell="lstm", num_layers=2, dropout=0.3, weight_drop=0.2), dict(optimizer="adam", lr=0.01, ema=0.9)),
    "gru random sampling (state reset), momentum": (dict(cell="gru"), dict(sampling="random", optimizer="momentum",
                                                                           lr=0.1)),
    "torch autograd, cosine schedule": (dict(cell="lstm", embed_size=4),
                                        dict(backend="torch", torch_impl="autograd", schedule="cosine")),
    "torch fused": (dict(), dict(backend="torch", torch_impl="fused")),
}


@pytest.fixture(autouse=True)
def needs_corpus():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


@pytest.fixture(autouse=True)
def terminal_ctrl_c():
    """Ctrl-C as at a terminal, also when the tests run in the background with SIGINT ignored."""
    with sigint_as_at_a_terminal():
        yield


def _configs(case: str):
    model, cfg = CASES[case]
    if cfg.get("backend") == "torch":
        pytest.importorskip("torch")
    return ModelConfig(num_hiddens=8, **model), dataclasses.replace(BASE, **cfg)


def _data(cfg: TrainConfig) -> DataConfig:
    """The tiny training split; torch scores the held-out stream in small calls, so it gets a short one."""
    return dataclasses.replace(DATA_CFG, val_fraction=0.005) if cfg.backend == "torch" else DATA_CFG


def _same_weights(a, b) -> None:
    a, b = a.backend.numpy_params(), b.backend.numpy_params()
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def _values(records) -> list:
    """What a record computes (not how fast): where it was taken, the losses, the samples."""
    keys = ("epoch", "step", "progress", "train_ppl", "val_ppl", "lr", "clip_frac", "samples")
    return [{k: r.get(k) for k in keys} for r in records]


@pytest.mark.parametrize("case,stop", [(case, 7) for case in CASES] + [(case, 19 + 3) for case in list(CASES)[1:3]])
def test_a_mid_epoch_checkpoint_resumes_exactly(tmp_path, case, stop):
    model, cfg = _configs(case)
    straight = train.new_run(_data(cfg), model, cfg)
    train.fit(straight, tmp_path / "straight", **QUIET)

    first = train.new_run(_data(cfg), model, cfg)
    train.fit(first, tmp_path / "split", stop_at_step=stop, **QUIET)
    ckpt = checkpoint.load(tmp_path / "split")
    assert ckpt.extra["step"] == stop and ckpt.extra["position"]["batch"] == stop % 19
    carried = cfg.sampling == "sequential"
    assert ckpt.extra["position"]["carried_state"] is carried and (ckpt.state is not None) is carried
    resumed = train.resume_run(tmp_path / "split")
    assert resumed.step == stop and resumed.position.batch == stop % 19
    train.fit(resumed, tmp_path / "split", **QUIET)

    _same_weights(straight, resumed)
    assert resumed.step == straight.step
    assert _values(train.read_metrics(tmp_path / "split")) == _values(train.read_metrics(tmp_path / "straight"))


def test_evaluation_and_checkpoints_every_n_steps(tmp_path):
    model, cfg = _configs("rnn sequential (carried state)")
    cfg = dataclasses.replace(cfg, eval_every="8steps", save_every="3steps")
    run = train.new_run(DATA_CFG, model, cfg)
    saved = []
    real_save = train.rundir.RunWriter.save

    def spy(self, ckpt, records, best):
        saved.append((ckpt.extra["step"], len(records)))
        return real_save(self, ckpt, records, best)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.rundir.RunWriter, "save", spy)
        train.fit(run, tmp_path, **QUIET)
    records = train.read_metrics(tmp_path)
    total = run.step
    assert total == 38
    assert [r["step"] for r in records] == [8, 16, 24, 32, 38]          # and the last epoch's end
    assert [r["epoch"] for r in records] == [0, 0, 1, 1, 2]
    assert records[0]["progress"] == pytest.approx(8 / 19) and records[-1]["progress"] == 2
    assert [s for s, _ in saved] == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24, 27, 30, 32, 33, 36, 38]
    assert all(n == sum(r["step"] <= s for r in records) for s, n in saved)   # a save adds no record


@pytest.mark.parametrize("spec,expected", [("", None), ("3", (3, "epoch")), ("2epochs", (2, "epoch")),
                                           ("500steps", (500, "step")), ("7 step", (7, "step"))])
def test_cadence_specs(spec, expected):
    from rnnlab.config import every
    assert every(spec) == expected


@pytest.mark.parametrize("spec", ["0steps", "-1", "ten", "5 minutes", "1.5"])
def test_a_bad_cadence_is_one_line(capsys, tmp_path, spec):
    code = cli.main(["train", *TINY, "--out", str(tmp_path / "run"), "--eval-every", spec])
    err = capsys.readouterr().err
    assert code == 1 and "--eval-every" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _interrupting(after: int, times: int = 1):
    """epoch_steps that sends this process SIGINT (`times` in a row) after `after` minibatches in all."""
    real, done = train.epoch_steps, [0]

    def steps(*args, **kwargs):
        for step in real(*args, **kwargs):
            done[0] += 1
            if done[0] == after:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
            yield step
    return steps


def test_ctrl_c_saves_the_current_step_and_the_run_resumes_exactly(capsys, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert cli.main(["train", *TINY, "--out", str(straight)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    monkeypatch.setattr(train, "epoch_steps", _interrupting(after=23))
    code = cli.main(["train", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "interrupted at epoch 2, minibatch 4 (step 23); saved that step in" in err
    ckpt = checkpoint.load(out)
    assert ckpt.epoch == 1 and ckpt.extra["step"] == 23 and ckpt.extra["position"]["batch"] == 4
    monkeypatch.undo()
    assert cli.main(["train", *TINY, "--out", str(out), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err
    a, b = checkpoint.load(straight), checkpoint.load(out)
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    assert _values(train.read_metrics(out)) == _values(train.read_metrics(straight))


def test_a_second_ctrl_c_stops_at_once_and_says_what_is_on_disk(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(train, "epoch_steps", _interrupting(after=23, times=2))
    code = cli.main(["train", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "the checkpoint in" in err and "is at epoch 1, step 19 (continue with --resume)" in err
    assert checkpoint.load(out).extra["step"] == 19


def test_ctrl_c_before_any_save_without_a_run_directory(capsys, monkeypatch):
    monkeypatch.setattr(train, "epoch_steps", _interrupting(after=2))
    code = cli.main(["train", *TINY, "--no-save"])
    err = capsys.readouterr().err
    assert code == 130 and "nothing is saved with --no-save" in err


def test_train_without_out_saves_to_a_named_default_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY, "--num-epochs", "1"]) == 0
    err = capsys.readouterr().err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("timemachine-")
    assert f"saving to runs/{runs[0].name} (--out DIR to choose" in err
    assert checkpoint.exists(runs[0])
    assert cli.main(["train", *TINY, "--num-epochs", "1"]) == 0          # a second run gets its own
    assert len(list((tmp_path / "runs").iterdir())) == 2
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--num-epochs", "1", "--no-save"]) == 0
    assert "saving nothing (--no-save)" in capsys.readouterr().err
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_no_save_with_out_is_refused(capsys, tmp_path):
    code = cli.main(["train", *TINY, "--no-save", "--out", str(tmp_path / "x")])
    assert code == 1 and "--no-save" in capsys.readouterr().err


@pytest.fixture
def source(tmp_path):
    """A tiny trained model on The Time Machine (d2l: lower-case letters and space)."""
    out = tmp_path / "source"
    run = train.new_run(DATA_CFG, ModelConfig(num_hiddens=8), BASE)
    train.fit(run, out, **QUIET)
    return out


def test_init_from_starts_a_new_run_from_trained_weights(capsys, tmp_path, source):
    text = tmp_path / "other.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "tuned"
    code = cli.main(["train", "--init-from", str(source), "--corpus", str(text), "--optimizer", "adam",
                     "--lr", "0.01", "--num-epochs", "1", "--out", str(out), "--quiet", "--backend", "numpy"])
    assert code == 0, capsys.readouterr().err
    src, tuned = checkpoint.load(source), checkpoint.load(out)
    assert tuned.vocab == src.vocab and tuned.epoch == 1
    assert tuned.config["model"] == src.config["model"]
    assert tuned.config["train"]["optimizer"] == "adam" and tuned.config["train"]["lr"] == 0.01
    assert tuned.extra["init_from"]["checkpoint"] == str(source.resolve())
    assert tuned.extra["init_from"]["epoch"] == src.epoch
    assert tuned.config["train"]["prefixes"] != src.config["train"]["prefixes"]     # prompts from the new text
    start = train.start_from(source, data={"corpus": str(text)}, train={"optimizer": "adam", "seed": 3})
    assert start.epoch == start.step == 0 and start.optimizer.state_dict()[0]["t"] == 0
    weights = start.backend.numpy_params()
    for name in src.params:                  # the source's weights exactly, not a fresh initialisation
        assert np.array_equal(weights[name], src.params[name]), name


def test_init_from_reports_tokens_the_vocabulary_lacks(capsys, tmp_path, source):
    text = tmp_path / "roman.txt"
    text.write_text("Ça, c'était l'été à Paris. " * 40, encoding="utf-8")
    args = ["train", "--init-from", str(source), "--corpus", str(text), "--preprocess", "raw", "--num-epochs",
            "1", "--quiet", "--backend", "numpy"]
    code = cli.main([*args, "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "are not in the vocabulary of" in err and "'é' x" in err and "--on-unknown unk" in err
    assert not (tmp_path / "refused").exists()
    code = cli.main([*args, "--out", str(tmp_path / "mapped"), "--on-unknown", "unk"])
    err = capsys.readouterr().err
    assert code == 0 and "they are mapped to <unk>" in err


def test_init_from_keeps_the_architecture(capsys, tmp_path, source):
    code = cli.main(["train", "--init-from", str(source), "--num-hiddens", "16", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1 and "--num-hiddens differs from the model in" in err and "--init-from" in err
    with pytest.raises(RnnlabError, match="--resume continues a run"):
        cli.cmd_train(cli.build_parser().parse_args(["train", "--init-from", str(source), "--resume", "--out",
                                                     str(source)]))


def test_resume_may_change_the_learning_rate_and_records_it(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(out), "--num-epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--out", str(out), "--resume", "--lr", "0.25"]) == 0
    err = capsys.readouterr().err
    assert "--lr changes from 1.0 to 0.25 at epoch 1" in err
    changes = [{"setting": "lr", "from": 1.0, "to": 0.25, "epoch": 1, "step": 19},
               {"setting": "num_epochs", "from": 1, "to": 2, "epoch": 1, "step": 19}]
    assert checkpoint.load(out).extra["changes"] == changes
    assert train.read_metrics(out)[-1]["changes"] == changes
    assert "changes" not in train.read_metrics(out)[0]
    assert checkpoint.load(out).config["train"]["lr"] == 0.25


def test_resuming_a_run_that_used_its_time_budget_says_so(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(out), "--num-epochs", "5", "--time-budget", "0.000001"]) == 0
    assert checkpoint.load(out).extra["step"] == 1
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--out", str(out), "--num-epochs", "5", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "already used its time budget" in said and "give a larger --time-budget" in said
    assert checkpoint.load(out).extra["step"] == 1
    assert cli.main(["train", *TINY, "--out", str(out), "--num-epochs", "5", "--resume", "--time-budget", "0"]) == 0
    ckpt = checkpoint.load(out)
    assert ckpt.epoch == 5 and [c["setting"] for c in ckpt.extra["changes"]] == ["time_budget"]


@pytest.mark.parametrize("damage,fragment", [
    (lambda m: m["position"].update(batch=0), "position.batch"),
    (lambda m: m["position"].pop("stats"), "position"),
    (lambda m: m["position"].update(carried_state=False), "tensors do not match"),
    (lambda m: m["position"]["stats"].update(tokens=-1), "position.stats.tokens"),
])
def test_a_damaged_position_is_one_clear_error(tmp_path, damage, fragment):
    model, cfg = _configs("rnn sequential (carried state)")
    train.fit(train.new_run(DATA_CFG, model, cfg), tmp_path, stop_at_step=5, **QUIET)
    meta_path = tmp_path / checkpoint.META_FILE
    meta = json.loads(meta_path.read_text())
    damage(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RnnlabError, match="corrupt checkpoint") as e:
        checkpoint.load(tmp_path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_in_a_real_process_saves_and_says_where(tmp_path):
    """SIGINT to a running `rnnlab train` process: exit 130, the step it names is the step on disk."""
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "rnnlab", "train", *TINY, "--num-epochs", "100000", "--log-every", "100000",
            "--out", str(out)]
    with sigint_as_at_a_terminal():
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                env={**os.environ, "RNNLAB_DATA": str(DATA)})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("saving to"):
            break
    time.sleep(1.0)                                  # well into training: tiny epochs take milliseconds
    proc.send_signal(signal.SIGINT)
    err = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "Traceback" not in err
    match = re.search(r"interrupted at epoch (\d+), minibatch (\d+) \(step (\d+)\); saved that step in", err)
    assert match, err
    ckpt = checkpoint.load(out)
    assert ckpt.extra["step"] == int(match[3]) and ckpt.epoch == int(match[1]) - 1
    assert ckpt.extra["position"]["batch"] == int(match[2])


@pytest.mark.parametrize("tokens,epochs", [(400, 50), (1_000_000, 8), (3_000_000, 3), (50_000_000, 1)])
def test_num_epochs_0_sizes_the_run_to_the_text(tokens, epochs):
    from types import SimpleNamespace

    from rnnlab import runstate
    dataset = SimpleNamespace(train=np.zeros(tokens, np.uint8))
    assert runstate.sized(TrainConfig(num_epochs=0), dataset).num_epochs == epochs
    assert runstate.sized(TrainConfig(num_epochs=7), dataset).num_epochs == 7


def test_own_text_defaults_and_the_preprocessing_report(capsys, tmp_path):
    text = tmp_path / "roman.txt"
    text.write_bytes("\ufeffÇa, c'était l'été à Paris. Élodie lisait près de la fenêtre.\n".encode() * 60)
    out = tmp_path / "run"
    assert cli.main(["train", "--corpus", str(text), "--num-hiddens", "16", "--embed-size", "8", "--backend",
                     "numpy", "--quiet", "--out", str(out), "--time-budget", "0", "--log-every", "25"]) == 0
    err = capsys.readouterr().err
    assert "using the defaults for your own text (--preset text" in err
    assert "preprocessing removes" not in err                       # unicode keeps every character
    ckpt = checkpoint.load(out)
    assert {"é", "à", "Ç", "É", "ê"} <= set(ckpt.vocab) and "\ufeff" not in ckpt.vocab
    train_cfg = ckpt.config["train"]
    assert ckpt.config["data"]["preprocess"] == "unicode" and ckpt.config["data"]["max_tokens"] == 0
    assert train_cfg["num_epochs"] == 50 and ckpt.epoch == 50                   # sized to a short text
    assert train_cfg["prefixes"] and all(p in text.read_text() for p in train_cfg["prefixes"])
    assert cli.main(["train", "--corpus", str(text), "--preprocess", "d2l", "--num-epochs", "1", "--backend",
                     "numpy", "--quiet", "--no-save", "--num-hiddens", "8"]) == 0
    err = capsys.readouterr().err
    assert "note: d2l preprocessing removes or replaces" in err and "--preprocess unicode keeps them" in err


def test_denormals_are_flushed_only_while_a_torch_cpu_backend_works():
    pytest.importorskip("torch")
    from rnnlab import backends
    from rnnlab.cells import init_params
    tiny = np.array([1e-39], np.float32)                       # a float32 denormal
    params = init_params(5, 4, np.random.default_rng(0), np.dtype(np.float32))
    with backends.denormals_flushed(backends.make_backend("torch", params, device="cpu")):
        assert (tiny * np.float32(1))[0] == 0                  # flushed, numpy included: the processor's mode
    assert (tiny * np.float32(1))[0] == tiny[0]                # and restored after
    with backends.denormals_flushed(backends.make_backend("numpy", params)):
        assert (tiny * np.float32(1))[0] == tiny[0]            # other backends are left alone


def test_a_compiled_run_says_it_is_compiling_before_its_slow_first_step(monkeypatch):
    pytest.importorskip("torch")
    cfg = dataclasses.replace(BASE, backend="torch", torch_impl="compile")
    run = train.new_run(DATA_CFG, ModelConfig(num_hiddens=8, cell="gru"), cfg)
    lines = []

    def first_step(*args, **kwargs):
        assert lines and lines[0].startswith("compiling the training step with torch.compile")
        raise KeyboardInterrupt                       # the line came first; no need to compile here
        yield

    monkeypatch.setattr(train, "epoch_steps", first_step)
    with pytest.raises(KeyboardInterrupt):
        train.fit(run, None, progress=False, log=lines.append)
    assert len(lines) == 1


def test_the_progress_bar_counts_minibatches_with_epoch_perplexity_and_speed(monkeypatch, tmp_path):
    import tqdm.auto
    bars = []

    class Bar:
        def __init__(self, total, initial, unit, **kwargs):
            self.total, self.n, self.unit, self.postfix = total, initial, unit, []
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.postfix.append(text)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model, cfg = _configs("rnn sequential (carried state)")
    train.fit(train.new_run(DATA_CFG, model, cfg), tmp_path / "a", stop_at_step=25, progress=True,
              log=lambda s: None)
    resumed = train.resume_run(tmp_path / "a")
    train.fit(resumed, tmp_path / "a", progress=True, log=lambda s: None)
    first, second = bars
    assert (first.unit, first.total, first.n) == ("step", 2 * 19, 25)
    assert (second.total, second.n) == (38, 38) and len(second.postfix) == 13      # resumed at step 25
    assert re.fullmatch(r"epoch 2/2  ppl \d+\.\d{3}  [\d,]+ tok/s", second.postfix[-1])


def test_a_process_told_to_ignore_ctrl_c_keeps_ignoring_it(monkeypatch, tmp_path):
    """Started in the background by a shell, a run inherits SIGINT ignored: training goes on to the end."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setattr(train, "epoch_steps", _interrupting(after=3))
        model, cfg = _configs("rnn sequential (carried state)")
        run = train.new_run(DATA_CFG, model, cfg)
        train.fit(run, tmp_path, **QUIET)
        assert run.epoch == cfg.num_epochs
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
