"""Inputs a user can get wrong, and what rnnlab makes of them: non-finite flag values and JSON, sizes too large
for memory or for int64, an n-gram order too large to count, devices that are not there, a prefix that starts
with '-', a corpus file with the wrong hash, Ctrl-C at start-up, and scores a model should never produce.
Each ends in one clear line on stderr (or a number that means something), never a traceback or a hang."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rnnlab import cells, checkpoint, cli, corpora, decoding, limits, ngram, optim, presets
from rnnlab.config import ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError

from helpers import one_line_error, run_cli as run, sigint_as_at_a_terminal
from conftest import DATA  # noqa: E402

TINY = ["--num-hiddens", "8", "--batch-size", "2", "--num-steps", "4", "--max-tokens", "200", "--num-epochs", "1",
        "--log-every", "1", "--backend", "numpy", "--quiet"]


@pytest.fixture(autouse=True)
def corpora_present():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


def strict_json(text: str):
    """JSON as strict parsers read it: NaN and Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny numpy run with a checkpoint, and a copy of it whose weights are NaN."""
    base = tmp_path_factory.mktemp("inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RNNLAB_DATA", str(DATA))
        mp.setenv("XDG_CACHE_HOME", str(base / "cache"))
        code, _, err = run("train", *TINY, "--out", base / "run")
    assert code == 0, err
    nan_run = base / "nan"
    ckpt = checkpoint.load(base / "run")
    ckpt.params = {k: np.full_like(v, np.nan) for k, v in ckpt.params.items()}
    checkpoint.save(nan_run, ckpt)
    return SimpleNamespace(out=base / "run", nan=nan_run)


# --- non-finite numbers: refused as flags, never printed as JSON -------------------------------------

def _flags(types) -> list[tuple[str, str, object]]:
    """(subcommand, flag, argparse type) of every option whose type is in `types`."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(command, action.option_strings[0], action.type) for command, p in sub.choices.items()
            for action in p._actions if action.option_strings and action.type in types]


REQUIRED = {"generate": ["--checkpoint", "x"], "eval": ["--checkpoint", "x"], "sweep": ["--out", "x"]}
FLOAT_FLAGS = [(c, f) for c, f, _ in _flags((float, cli.finite_float))]


def test_every_number_flag_is_finite_or_int64():
    assert not _flags((float, int)), "a flag still parses a plain float or int"
    expected = {("eval", "--dynamic-lr"), ("eval", "--dynamic-decay"), ("eval", "--mix-weight"),
                ("sweep", "--budget"), ("train", "--lr"), ("train", "--clip"), ("train", "--val-fraction"),
                ("generate", "--temperature"), ("baseline", "--val-fraction"), ("sweep", "--dropout")}
    assert expected <= set(FLOAT_FLAGS)
    ints = {(c, f) for c, f, _ in _flags((cli.int64,))}
    assert {("train", "--num-hiddens"), ("generate", "--num-chars"), ("generate", "--num-samples"),
            ("baseline", "--order"), ("eval", "--mix-ngram"), ("bench", "--repeats")} <= ints


@pytest.mark.parametrize("command, flag", FLOAT_FLAGS)
def test_non_finite_flag_values_are_refused(command, flag):
    for value in ("nan", "inf", "-inf", "Infinity", "-NaN"):
        code, out, err = run(command, f"{flag}={value}", *REQUIRED.get(command, []))
        one_line_error(code, err, flag, "not a finite number", exit_code=2)


@pytest.mark.parametrize("argv", [["train", "--num-hiddens", str(10 ** 30)],
                                  ["generate", "--checkpoint", "x", "--num-samples", str(-10 ** 19)],
                                  ["baseline", "--order", "5", str(2 ** 63)]])
def test_integers_beyond_int64_are_refused(argv):
    one_line_error(*run(*argv)[::2], "too large", exit_code=2)


def test_json_output_is_strict(trained):
    for argv in (["eval", "--checkpoint", trained.out, "--backend", "numpy", "--json"],
                 ["generate", "--checkpoint", trained.out, "--json", "--backend", "numpy"],
                 ["baseline", "--order", "2", "--max-tokens", "1000", "--json"],
                 ["corpora", "--json"]):
        code, out, err = run(*argv)
        assert code == 0, err
        for line in out.splitlines() if argv[0] == "baseline" else [out]:
            strict_json(line)


def test_a_nan_checkpoint_gives_null_or_one_line(trained):
    """A checkpoint whose weights are NaN: eval prints strict JSON (perplexity null) or refuses the file."""
    code, out, err = run("eval", "--checkpoint", trained.nan, "--backend", "numpy", "--json")
    if code == 0:
        result = strict_json(out)
        assert result["perplexity"] is None and result["nats_per_token"] is None
    else:
        one_line_error(code, err, exit_code=1)
    code, out, err = run("generate", "--checkpoint", trained.nan, "--backend", "numpy")
    line = one_line_error(code, err, exit_code=1)
    assert "non-finite" in line or "corrupt" in line
    assert out == ""


# --- decoding: any temperature > 0, never <unk>, never garbage ---------------------------------------

def test_tiny_temperature_is_the_argmax_over_the_allowed_tokens():
    logits = np.array([[9.0, 1.0, 3.0, 2.0], [50.0, -1.0, -1.0 + 1e-9, -7.0]] * 100)
    for temperature in (1e-310, 5e-324, 1e-30):
        with np.errstate(all="raise"):          # no warning escapes either
            picked = decoding.pick(logits, temperature, np.random.default_rng(0), never=[0])
        assert picked.tolist() == [2, 2] * 100


def test_huge_temperature_is_uniform_over_the_allowed_tokens():
    logits = np.tile([1e300, -1e300, 0.0, 5.0], (4000, 1))
    with np.errstate(all="raise"):
        picked = decoding.pick(logits, 1e308, np.random.default_rng(0), never=[0])
    counts = np.bincount(picked, minlength=4)
    assert counts[0] == 0 and all(1200 < c < 1470 for c in counts[1:]), counts


@pytest.mark.parametrize("temperature", [0.0, 1e-310, 1.0])
def test_unk_is_never_emitted_even_when_the_model_prefers_it(temperature):
    from rnnlab.text import Vocab

    def step(token_ids, state):              # <unk> (id 0) always scores highest
        logits = np.tile([4.0, 1.0, 0.5, 0.0], (len(token_ids), 1))
        return logits, state

    from rnnlab.config import DataConfig, ModelConfig
    from rnnlab.lm import LM
    model = SimpleNamespace(decoder=lambda: step, begin_state=lambda b: np.zeros((1, b)))
    lm = LM(model, Vocab("abc"), DataConfig(preprocess="raw"), ModelConfig())
    texts = lm.generate("a", num_preds=30, temperature=temperature, num_samples=16)
    assert all("<unk>" not in t and len(t) == 31 for t in texts)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_scores_are_an_error(bad, temperature):
    def step(token_ids, state):
        logits = np.zeros((len(token_ids), 4))
        logits[:, 2] = bad
        return logits, state

    with pytest.raises(RnnlabError, match="non-finite scores"):
        decoding.generate(step, np.zeros((1, 3)), [1], 5, temperature, np.random.default_rng(0), [0])


def test_bad_temperatures_and_an_unusable_vocabulary():
    def step(token_ids, state):
        return np.zeros((len(token_ids), 1)), state

    for temperature in (np.inf, np.nan, -1e-300):
        with pytest.raises(RnnlabError, match="temperature"):
            decoding.generate(step, np.zeros((1, 1)), [0], 3, temperature)
    with pytest.raises(RnnlabError, match="no token may be generated"):
        decoding.generate(step, np.zeros((1, 1)), [0], 3, never_sample=[0])


# --- sizes: checked against the machine's memory before anything is allocated -----------------------

@pytest.mark.parametrize("model, train, flag", [
    (dict(num_hiddens=10 ** 9), {}, "--num-hiddens 1000000000"),
    (dict(num_layers=10 ** 6), {}, "--num-layers 1000000"),
    (dict(num_hiddens=10 ** 30, num_layers=10 ** 30), {}, "--num-hiddens"),
    (dict(embed_size=10 ** 12), {}, "--embed-size"),
    ({}, dict(num_preds=10 ** 12), "--num-preds"),
    ({}, dict(batch_size=10 ** 9, num_steps=10 ** 4), "--batch-size"),
])
def test_check_train_refuses_what_cannot_fit(model, train, flag):
    tracemalloc.start()
    try:
        with pytest.raises(RnnlabError) as e:
            limits.check_train(28, ModelConfig(**model), TrainConfig(**train))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20                                  # arithmetic only: nothing of that size is built
    msg = str(e.value)
    assert flag in msg and "would need about" in msg and "GiB; this machine has" in msg
    assert len(msg) < 400 and "\n" not in msg


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_check_train_accepts_the_presets(name):
    data, model, train = presets.apply(name, {}, {}, {})
    for vocab_size in (28, 4580):
        limits.check_train(vocab_size, ModelConfig(**model), TrainConfig(**train))


@pytest.mark.parametrize("cell, num_layers, num_hiddens, B, T, V, optimizer", [
    ("rnn", 1, 256, 16, 20, 28, "sgd"), ("lstm", 2, 128, 8, 30, 60, "adam"), ("gru", 1, 64, 64, 10, 500, "momentum")])
def test_the_training_estimate_bounds_the_reference_backends_peak(cell, num_layers, num_hiddens, B, T, V,
                                                                   optimizer):
    from rnnlab.backends.numpy_backend import NumpyBackend
    model = ModelConfig(cell=cell, num_layers=num_layers, num_hiddens=num_hiddens)
    train = TrainConfig(batch_size=B, num_steps=T, optimizer=optimizer, prefixes=("ab",), num_preds=10)
    tracemalloc.start()
    try:
        backend = NumpyBackend(cells.init_params(V, num_hiddens, np.random.default_rng(0), np.float32, cell,
                                                 num_layers))
        opt, state = optim.make_optimizer(optimizer, 0.0, 0.9), backend.begin_state(B)
        X = np.random.default_rng(1).integers(0, V, (B, T))
        for _ in range(2):
            _, grads, state = backend.loss_and_grads(X, X, state)
            backend.update(lambda params: opt.step(params, grads, 0.1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = limits.estimate_train_bytes(V, model, train)
    assert peak <= estimate <= 5 * peak, (peak, estimate)


@pytest.mark.parametrize("arch", [dict(), dict(cell="gru", num_layers=3), dict(cell="lstm", num_layers=2,
                                                                              embed_size=7)])
def test_num_params_matches_the_parameter_shapes(arch):
    shapes = cells.param_shapes(31, 12, arch.get("cell", "rnn"), arch.get("num_layers", 1),
                                arch.get("embed_size", 0))
    assert limits.num_params(31, 12, **arch) == sum(int(np.prod(s)) for s in shapes.values())


def test_generate_estimate_and_check():
    model = ModelConfig()
    small = limits.estimate_generate_bytes(28, 512, 1, "rnn", 1, 50, 14)
    assert 0 < small < 1 << 20
    limits.check_generate(28, model, 64, 10_000, 14)
    for num_samples, num_chars in ((1, 10 ** 12), (10 ** 12, 50), (2 ** 62, 2 ** 62)):
        with pytest.raises(RnnlabError, match="--num-samples .* x --num-chars .* would need about"):
            limits.check_generate(28, model, num_samples, num_chars, 14)


def test_memory_bytes_and_its_fallback(monkeypatch):
    total = limits.memory_bytes()
    assert isinstance(total, int) and total >= 1 << 26

    def unsupported(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", unsupported)
    assert limits.memory_bytes() == limits.FALLBACK_MEMORY


def test_format_bytes_stays_short():
    assert limits.format_bytes(209 * (1 << 30)) == "209 GiB"
    assert limits.format_bytes(3 << 20) == "3 MiB"
    assert limits.format_bytes(10 ** 400) == "9.31e+390 GiB"
    assert limits.format_bytes(100) == "100 bytes"


@pytest.mark.parametrize("flag, value", [("--num-chars", 10 ** 12), ("--num-samples", 10 ** 12),
                                         ("--num-chars", 2 ** 63 - 1)])
def test_generate_refuses_sizes_that_cannot_fit(trained, flag, value, monkeypatch):
    from rnnlab import decoding

    def never(*args, **kwargs):
        pytest.fail("decoding started before the size was checked")

    monkeypatch.setattr(decoding, "stream", never)
    code, out, err = run("generate", "--checkpoint", trained.out, "--backend", "numpy", flag, value)
    one_line_error(code, err, f"{flag} {value}", "GiB", exit_code=1)
    assert out == ""


# --- n-gram orders: compared in logarithms, never computed as a power ---------------------------------

def test_huge_order_is_refused_at_once():
    """V ** 10**12 would never finish: the check compares logarithms (a regression hangs here)."""
    with pytest.raises(RnnlabError, match="--order 1000000000000 over 28 token types is too large"):
        ngram.KneserNey(10 ** 12, 28)
    with pytest.raises(RnnlabError, match="too few"):
        ngram.KneserNey(10 ** 12, 1).fit(np.zeros(100, dtype=np.int64))


def test_max_order_is_the_largest_that_fits():
    for V in (2, 3, 28, 4580, 2 ** 31, 2 ** 31 + 1, 10 ** 6):
        n = ngram.max_order(V)
        assert V ** n < 2 ** ngram.KEY_BITS <= V ** (n + 1)
        ngram.KneserNey(n, V)
        with pytest.raises(RnnlabError):
            ngram.KneserNey(n + 1, V)


def test_cli_huge_orders_end_in_one_line(trained):
    one_line_error(*run("baseline", "--order", 10 ** 12)[::2], "--order", "too large", exit_code=1)
    one_line_error(*run("eval", "--checkpoint", trained.out, "--backend", "numpy", "--mix-ngram", 10 ** 12)[::2],
                   "too large", exit_code=1)


# --- devices --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, fragment", [("bogus", "unknown device"), ("meta", "cpu, cuda or cuda:N"),
                                              ("cuda:99", "cuda:99")])
@pytest.mark.parametrize("command", ["bench", "generate", "eval"])
def test_bad_device_is_one_line(trained, command, device, fragment):
    torch = pytest.importorskip("torch")
    extra = ["--checkpoint", trained.out, "--backend", "torch"] if command != "bench" else ["--quick"]
    code, out, err = run(command, "--device", device, *extra)
    if device.startswith("cuda") and not torch.cuda.is_available():
        fragment = "CUDA is not available"
    one_line_error(code, err, fragment, exit_code=1)


def test_cuda_without_cuda_is_one_line():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(*run("bench", "--device", "cuda", "--quick")[::2], "--device cuda: CUDA is not available")


# --- a prefix that starts with '-' ---------------------------------------------------------------------

def test_dash_prefix_hint_and_equals_form(trained):
    code, out, err = run("generate", "--checkpoint", trained.out, "--prefix", "-abc")
    one_line_error(code, err, "--prompt=-abc", exit_code=2)
    code, out, err = run("generate", "--checkpoint", trained.out, "--backend", "numpy", "--num-chars", "5",
                         "--prefix=-abc", "--json")
    assert code == 0, err
    result = strict_json(out)
    assert result["prefix"] == "-abc" and result["samples"][0].startswith(" abc")   # d2l: '-' -> ' '
    assert len(result["samples"][0]) == 4 + 5


# --- a corpus file with the wrong hash -------------------------------------------------------------------

def test_wrong_hash_is_named_not_called_missing(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "timemachine.txt").write_text("not the time machine\n")
    monkeypatch.setenv("RNNLAB_DATA", str(data_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(name, *args, **kwargs):
        raise RnnlabError(f"could not download corpus {name!r}: offline")

    monkeypatch.setattr(corpora, "download", offline)
    code, out, err = run("baseline", "--order", "2")
    digest = corpora.sha256_file(data_dir / "timemachine.txt")
    line = one_line_error(code, err, f"found {data_dir / 'timemachine.txt'} but its SHA-256 is {digest}, "
                                     f"expected {corpora.CORPORA['timemachine'].sha256}", "offline", exit_code=1)
    assert "not found" not in line


# --- start-up: a light package, and Ctrl-C while the command line loads ---------------------------------

def test_import_rnnlab_is_light_and_the_public_api_works():
    code = ("import sys, rnnlab; light = 'numpy' not in sys.modules and 'rnnlab.text' not in sys.modules; "
            "from rnnlab import DataConfig, GenerateConfig, ModelConfig, RnnlabError, TrainConfig, Vocab, "
            "load_corpus, preprocess, tokenize, __version__; from rnnlab import *; "
            "assert all(getattr(rnnlab, n) is not None for n in rnnlab.__all__) and 'Vocab' in dir(rnnlab); "
            "from rnnlab import decoding; print(light, load_corpus('ab ab')[1].idx_to_token)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 1) == ["True", "['<unk>', 'a', 'b', ' ']\n"]
    import rnnlab
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rnnlab.nope


def _console_script() -> str:
    script = shutil.which("rnnlab", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the rnnlab console script is not installed beside this Python")
    return script


def _interrupt_during_imports(argv: list[str]) -> tuple[int, str]:
    """Start `argv` with import timing on stderr; send SIGINT as soon as rnnlab loads a module of its own
    beyond the package and its tiny entry module, i.e. while the command line is being imported."""
    with sigint_as_at_a_terminal():
        proc = subprocess.Popen([sys.executable, "-X", "importtime", *argv], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        seen.append(line)
        module = line.rsplit("|", 1)[-1].strip()
        if module.startswith("rnnlab.") and module != "rnnlab.__main__":
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read().decode(errors="replace")
    proc.wait(timeout=60)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(how):
    argv = [_console_script()] if how == "console script" else ["-m", "rnnlab"]
    for attempt in range(3):          # the command may finish before the signal lands: try again
        code, err = _interrupt_during_imports([*argv, "corpora"])
        if code != 0:
            break
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and "rnnlab: interrupted" in err


def test_console_script_runs():
    out = subprocess.run([_console_script(), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("rnnlab ")
