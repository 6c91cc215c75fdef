"""The command line, driven through `rnnlab.cli.main(argv)`: help, tiny training runs with a run directory,
resuming, generating, evaluating, and one clear line on stderr (no traceback) for every bad input."""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rnnlab import backends, cli, presets
from rnnlab.config import DataConfig, GenerateConfig, ModelConfig, TrainConfig, validate_sizes

from conftest import DATA  # noqa: E402  (the corpora folder: $RNNLAB_DATA or ../shared/data)
TINY = ["--num-hiddens", "16", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "400",
        "--num-epochs", "2", "--log-every", "1", "--backend", "numpy", "--quiet"]
RECORD_KEYS = {"epoch", "train_ppl", "val_ppl", "val_bpc", "tokens_per_s", "elapsed_s"}


def tiny(**changes) -> list[str]:
    """TINY with some flags changed (num_epochs=3 -> --num-epochs 3); a value of None drops the flag."""
    argv = list(TINY)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _set_env(mp, cache: Path) -> None:
    mp.setenv("RNNLAB_DATA", str(DATA))
    mp.setenv("XDG_CACHE_HOME", str(cache))
    mp.setenv("COLUMNS", "200")


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    _set_env(monkeypatch, tmp_path / "xdg-cache")


def run(capsys, *argv) -> tuple[int, str, str]:
    """cli.main's exit code and output; a usage error (argparse's SystemExit, status 2) counts as its code."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].strip()
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (best/ included), by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def weights_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("weights-*.safetensors"))


def read_metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (2 epochs, numpy, H=16) with --out and --json, shared read-only by the tests."""
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    base = tmp_path_factory.mktemp("trained")
    out = base / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, base / "xdg-cache")
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["train", *TINY, "--out", str(out), "--json"])
    assert code == 0, stderr.getvalue()
    return SimpleNamespace(out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue(), files=snapshot(out))


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run, for tests that resume, overwrite or corrupt it."""
    return Path(shutil.copytree(trained.out, tmp_path / "run"))


def generate_json(capsys, checkpoint, *argv) -> list[str]:
    code, out, err = run(capsys, "generate", "--checkpoint", checkpoint, "--json", *argv)
    assert code == 0, err
    result = json.loads(out)
    return result["samples"]


# --- help --------------------------------------------------------------------------------------------

def help_entries(text: str) -> dict[str, str]:
    """flag -> its help entry (invocation and help text, whitespace normalised), from argparse's output."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"^ {2}-\S", line):
            current = [line.strip()]
            entries.append(current)
        elif current is not None and line.startswith("   ") and line.strip():
            current.append(line.strip())
        else:
            current = None
    by_flag = {}
    for lines in entries:
        invocation = re.split(r"\s{2,}", lines[0], maxsplit=1)[0]
        for flag in re.findall(r"(?<![\w-])--?[\w-]+", invocation):
            by_flag[flag] = " ".join(" ".join(lines).split())
    return by_flag


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(repr(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


SUBCOMMAND_CONFIGS = {"train": (DataConfig, ModelConfig, TrainConfig), "generate": (GenerateConfig,),
                      "eval": (), "score": (), "corpora": (), "baseline": (DataConfig,)}
LITERAL_DEFAULTS = {
    "train": {"--clip": "1.0", "--theta": "1.0", "--num-hiddens": "512", "--batch-size": "32",
              "--num-steps": "35", "--lr": "1.0", "--num-epochs": "500", "--corpus": "'timemachine'",
              "--prefixes": "'time traveller' 'traveller'", "--data-dir": "None"},
    "generate": {"--prefix": "the run's own prompts", "--num-chars": "100",
                 "--temperature": "0 for the book's model, else 0.8", "--seed": "0", "--top-k": "0",
                 "--top-p": "1.0", "--beam": "0",
                 "--num-samples": "1", "--device": "auto"},
    "eval": {"--split": "val", "--device": "auto"},
    "score": {"--top": "5", "--max-chars": str(cli.SCORE_MAX_CHARS), "--device": "auto"},
    "corpora": {},
    "baseline": {"--order": "5", "--corpus": "'timemachine'"},
}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", list(SUBCOMMAND_CONFIGS))
def test_help_shows_every_flag_with_its_default(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    entries = help_entries(out)
    # every flag of the subcommand is listed
    for action in _subparser(command)._actions:
        for option in action.option_strings:
            assert option in entries, f"{option} missing from `{command} --help`"
        default = action.default
        if isinstance(default, list):
            default = " ".join(map(str, default))
        if action.option_strings and default not in (None, False, argparse.SUPPRESS) and action.help:
            assert f"(default: {default}" in entries[action.option_strings[0]]
    # every config field, with the default it really has
    for cls in SUBCOMMAND_CONFIGS[command]:
        for f in dataclasses.fields(cls):
            flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
            shown = f.metadata.get("shown") or _shown(f.default)
            assert f"(default: {shown})" in entries[flag], (flag, entries[flag])
    for flag, shown in LITERAL_DEFAULTS[command].items():
        assert f"(default: {shown})" in entries[flag], (flag, entries[flag])


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMAND_CONFIGS:
        assert command in out


@pytest.mark.parametrize("command, flag", [("generate", "--backend"), ("eval", "--backend"),
                                           ("eval", "--corpus")])
def test_help_default_shown_once(capsys, command, flag):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    entry = help_entries(capsys.readouterr().out)[flag]
    assert entry.count("(default:") == 1, entry


# --- train -------------------------------------------------------------------------------------------

def test_train_writes_run_directory(trained):
    names = set(trained.files)
    assert {"metrics.jsonl", "checkpoint.json", "perplexity.png"} <= names
    weights = weights_files(trained.out)
    assert len(weights) == 1
    best = weights_files(trained.out / "best")
    assert names - {".lock"} == {"metrics.jsonl", "checkpoint.json", "perplexity.png", weights[0].name,
                                  "best/checkpoint.json", f"best/{best[0].name}"}
    assert trained.files["perplexity.png"].startswith(b"\x89PNG\r\n\x1a\n")

    records = read_metrics(trained.out)
    assert [r["epoch"] for r in records] == [1, 2]           # --log-every 1
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert r["train_ppl"] > 1 and r["val_ppl"] > 1 and r["tokens_per_s"] > 0 and r["elapsed_s"] >= 0
        assert math.isclose(r["val_bpc"], math.log2(r["val_ppl"]), rel_tol=1e-9)

    meta = json.loads(trained.files["checkpoint.json"])
    assert meta["epoch"] == 2 and meta["weights"] == weights[0].name
    assert meta["config"]["model"]["num_hiddens"] == 16
    assert meta["config"]["train"]["batch_size"] == 4 and meta["config"]["train"]["num_steps"] == 5


def test_train_json_output_parses(trained):
    final = json.loads(trained.stdout)          # stdout is exactly one JSON document
    assert final["out"] == str(trained.out)
    assert final["epoch"] == 2
    assert RECORD_KEYS <= set(final)
    last = read_metrics(trained.out)[-1]
    assert final["val_ppl"] == last["val_ppl"] and final["train_ppl"] == last["train_ppl"]


def test_train_without_out_prints_summary(capsys):
    code, out, err = run(capsys, "train", *tiny(num_epochs=1))
    assert code == 0, err
    assert "perplexity" in out and "held-out" in out
    assert "corpus timemachine.txt" in err


def test_train_into_existing_run_is_refused(capsys, run_copy):
    before = snapshot(run_copy)
    code, out, err = run(capsys, "train", *TINY, "--out", run_copy)
    assert_one_line_error(code, err, "--resume", "--overwrite")
    assert code == 1
    assert snapshot(run_copy) == before


def test_overwrite_replaces_run(capsys, run_copy):
    code, out, err = run(capsys, "train", *tiny(num_epochs=1), "--out", run_copy, "--overwrite")
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(run_copy)] == [1]
    assert [p.name for p in weights_files(run_copy)][0].startswith("weights-e000001-")
    assert len(weights_files(run_copy)) == 1


def test_resume_continues_and_matches_an_uninterrupted_run(capsys, run_copy, trained, tmp_path):
    code, out, err = run(capsys, "train", *tiny(num_epochs=3), "--out", run_copy, "--resume")
    assert code == 0, err
    assert "resuming" in err
    resumed = read_metrics(run_copy)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == read_metrics(trained.out)            # the earlier records are kept as they were
    assert json.loads((run_copy / "checkpoint.json").read_text())["epoch"] == 3
    weights = weights_files(run_copy)
    assert len(weights) == 1 and weights[0].name.startswith("weights-e000003-")

    straight = tmp_path / "straight"
    code, out, err = run(capsys, "train", *tiny(num_epochs=3), "--out", straight)
    assert code == 0, err
    for a, b in zip(resumed, read_metrics(straight)):
        for key in ("epoch", "train_ppl", "val_ppl", "val_bpc", "samples"):
            assert a[key] == b[key], key


@pytest.mark.parametrize("flag, value", [("--num-hiddens", "32"), ("--seed", "3"), ("--batch-size", "8")])
def test_resume_with_different_run_settings_is_refused(capsys, run_copy, flag, value):
    before = snapshot(run_copy)
    argv = tiny(num_epochs=3, **{flag[2:].replace("-", "_"): value})
    code, out, err = run(capsys, "train", *argv, "--out", run_copy, "--resume")
    assert_one_line_error(code, err, f"{flag} differs from the checkpoint")
    assert snapshot(run_copy) == before


def test_resume_needs_out(capsys):
    code, out, err = run(capsys, "train", *TINY, "--resume")
    assert_one_line_error(code, err, "--resume needs --out")


def test_resume_without_a_checkpoint(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--num-epochs", "3", "--quiet", "--out", tmp_path / "empty",
                         "--resume")
    assert_one_line_error(code, err, "no checkpoint")


def test_resume_without_a_checkpoint_with_run_flags(capsys, tmp_path):
    code, out, err = run(capsys, "train", *TINY, "--out", tmp_path / "empty", "--resume")
    assert_one_line_error(code, err, "no checkpoint")


def test_resume_with_corrupt_checkpoint_json(capsys, run_copy):
    (run_copy / "checkpoint.json").write_bytes(b"\xff\xfe\x00garbage\x81")
    code, out, err = run(capsys, "train", *TINY, "--out", run_copy, "--resume")
    assert_one_line_error(code, err, "corrupt checkpoint")


# --- generate ----------------------------------------------------------------------------------------

def test_generate_greedy_is_deterministic(capsys, trained):
    argv = ["--prefix", "time traveller", "--num-chars", "40", "--backend", "numpy"]
    first = generate_json(capsys, trained.out, *argv)
    second = generate_json(capsys, trained.out, *argv)
    assert first == second
    assert len(first) == 1
    assert first[0].startswith("time traveller") and len(first[0]) == len("time traveller") + 40

    code, out, err = run(capsys, "generate", "--checkpoint", trained.out, *argv)
    assert code == 0 and out == first[0] + "\n"


def test_generate_sampling_follows_the_seed(capsys, trained):
    argv = ["--temperature", "1", "--num-samples", "8", "--num-chars", "200", "--backend", "numpy",
            "--prefix", "time traveller"]
    a = generate_json(capsys, trained.out, *argv, "--seed", "1")
    b = generate_json(capsys, trained.out, *argv, "--seed", "1")
    c = generate_json(capsys, trained.out, *argv, "--seed", "2")
    assert a == b
    assert len(a) == 8 and all(len(s) == len("time traveller") + 200 and "<unk>" not in s for s in a)
    assert a != c                   # 8 x 200 sampled characters: equal only with negligible probability
    assert len(set(a)) > 1          # the samples of one call are independent draws


def test_generate_on_torch_matches_numpy(capsys, trained):
    pytest.importorskip("torch")
    on_numpy = generate_json(capsys, trained.out, "--num-chars", "50", "--backend", "numpy")
    on_torch = generate_json(capsys, trained.out, "--num-chars", "50", "--backend", "torch")
    assert on_torch == on_numpy


def test_generate_punctuation_prefix_maps_to_a_space(capsys, trained):
    """d2l preprocessing maps every run of non-letters to one space: such a prefix is a single space."""
    punct = generate_json(capsys, trained.out, "--prefix", "?!.,;", "--num-chars", "20", "--backend", "numpy")
    space = generate_json(capsys, trained.out, "--prefix", " ", "--num-chars", "20", "--backend", "numpy")
    assert punct == space
    assert punct[0].startswith(" ") and len(punct[0]) == 1 + 20
    upper = generate_json(capsys, trained.out, "--prefix", "Time Traveller", "--backend", "numpy")
    lower = generate_json(capsys, trained.out, "--prefix", "time traveller", "--backend", "numpy")
    assert upper == lower


def test_generate_empty_prefix_is_refused(capsys, trained):
    code, out, err = run(capsys, "generate", "--checkpoint", trained.out, "--prefix", "", "--backend", "numpy")
    assert_one_line_error(code, err, "prompt is empty")
    assert out == ""


@pytest.mark.parametrize("argv, fragment", [
    (["--num-samples", "0"], "--num-samples"),
    (["--num-chars", "-1"], "--num-chars"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--seed", "-1"], "--seed"),
])
def test_generate_bad_values(capsys, trained, argv, fragment):
    code, out, err = run(capsys, "generate", "--checkpoint", trained.out, "--backend", "numpy", *argv)
    assert_one_line_error(code, err, fragment)


# --- eval --------------------------------------------------------------------------------------------

def test_eval_json_matches_training(capsys, trained):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"perplexity", "bits_per_char", "tokens"} <= set(result)
    last = read_metrics(trained.out)[-1]
    assert result["tokens"] == last["val_tokens"]
    assert math.isclose(result["perplexity"], last["val_ppl"], rel_tol=1e-6)
    assert math.isclose(result["bits_per_char"], math.log2(result["perplexity"]), rel_tol=1e-9)
    assert result["checkpoint_epoch"] == 2 and result["split"] == "val"
    assert Path(result["corpus"]).name == "timemachine.txt"


def test_eval_dynamic_leaves_the_checkpoint_alone(capsys, trained):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", "--json")
    static = json.loads(out)
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", "--json",
                         "--dynamic-lr", "0.5", "--dynamic-steps", "50")
    assert code == 0, err
    dynamic = json.loads(out)
    assert dynamic["dynamic"] == {"lr": 0.5, "num_steps": 50, "decay": 0.0, "rule": "sgd"} and static["dynamic"] is None
    assert dynamic["tokens"] == static["tokens"]
    assert dynamic["perplexity"] != static["perplexity"]
    assert snapshot(trained.out) == trained.files              # the weights on disk never change
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", "--json")
    assert json.loads(out)["perplexity"] == static["perplexity"]


def test_eval_mixture_with_ngram(capsys, trained):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy",
                         "--mix-ngram", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    mix = result["mixture"]
    assert mix["ngram_order"] == 5 and mix["model_weight"] == 0.5 and result["dynamic"] is None
    assert math.isclose(mix["model_perplexity"], read_metrics(trained.out)[-1]["val_ppl"], rel_tol=1e-6)
    code, out, err = run(capsys, "baseline", "--checkpoint", trained.out, "--order", "5", "--json")
    assert math.isclose(mix["ngram_perplexity"], json.loads(out)["perplexity"], rel_tol=1e-12)
    # the n-gram is fitted on the model's own training split (400 tokens here), so both are weak, and
    # the mixture beats each of them
    assert result["perplexity"] < min(mix["model_perplexity"], mix["ngram_perplexity"])


@pytest.mark.parametrize("argv", [["--dynamic-lr", "-1"], ["--dynamic-lr", "1", "--dynamic-steps", "0"],
                                  ["--dynamic-lr", "1", "--dynamic-decay", "-1"]])
def test_eval_dynamic_bad_values(capsys, trained, argv):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", *argv)
    assert_one_line_error(code, err, "dynamic evaluation")


@pytest.mark.parametrize("argv, fragment", [(["--mix-ngram", "-2"], "--mix-ngram"),
                                            (["--mix-ngram", "3", "--mix-weight", "2"], "--mix-weight"),
                                            (["--mix-ngram", "3", "--dynamic-lr", "0.1", "--eval-batch", "4"],
                                             "one stream")])
def test_eval_mixture_bad_values(capsys, trained, argv, fragment):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", *argv)
    assert_one_line_error(code, err, fragment)


def test_eval_mixes_the_dynamically_adapted_model(capsys, trained):
    """--dynamic-lr with --mix-ngram: the model adapts as it reads and its predictions are mixed with the
    n-gram's; each alone is reported beside the mixture, and the model alone is the dynamic figure."""
    common = ["eval", "--checkpoint", trained.out, "--backend", "numpy", "--json", "--dynamic-lr", "0.1"]
    code, out, err = run(capsys, *common)
    assert code == 0, err
    dynamic = json.loads(out)
    code, out, err = run(capsys, *common, "--mix-ngram", "3")
    assert code == 0, err
    both = json.loads(out)
    assert both["dynamic"] == dynamic["dynamic"] and both["mixture"]["ngram_order"] == 3
    # a float32 model: alone, the figure sums each segment's float32 mean loss; mixed, the float64 NLL of each token
    assert both["mixture"]["model_perplexity"] == pytest.approx(dynamic["perplexity"], rel=1e-6)
    assert both["tokens"] == dynamic["tokens"] and both["perplexity"] != dynamic["perplexity"]
    code, out, err = run(capsys, *common[:-3], "--dynamic-lr", "0.1", "--mix-ngram", "3")
    assert code == 0 and out.startswith("held-out perplexity") and "of the mixture with dynamic evaluation" in out


def test_eval_dynamic_rms_rule(capsys, trained):
    common = ["eval", "--checkpoint", trained.out, "--backend", "numpy", "--json", "--dynamic-lr"]
    code, out, err = run(capsys, *common, "0.001", "--dynamic-rule", "rms")
    assert code == 0, err
    rms = json.loads(out)
    code, out, err = run(capsys, *common, "0.001")
    assert code == 0, err
    assert rms["dynamic"]["rule"] == "rms" and json.loads(out)["dynamic"]["rule"] == "sgd"
    assert rms["perplexity"] != json.loads(out)["perplexity"] and math.isfinite(rms["perplexity"])
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", "--dynamic-rule", "rms")
    assert_one_line_error(code, err, "--dynamic-lr")


def test_eval_rms_rule_on_another_corpus_takes_its_statistics_from_the_models_own_training_split(
        capsys, monkeypatch, trained):
    from rnnlab import evaluate
    from rnnlab.checkpoint import load_model
    from rnnlab.runstate import load_dataset
    seen = []
    real = evaluate.gradient_ms
    monkeypatch.setattr(evaluate, "gradient_ms", lambda backend, tokens, *a: seen.append(tokens) or real(
        backend, tokens, *a))
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--backend", "numpy", "--corpus",
                         "war_of_the_worlds", "--dynamic-lr", "0.001", "--dynamic-rule", "rms", "--json")
    assert code == 0, err
    m = load_model(trained.out, backend="numpy")
    own_train = load_dataset(m.data_cfg, m.vocab).train
    assert len(seen) == 1 and np.array_equal(seen[0], own_train)
    assert json.loads(out)["corpus"].endswith("war_of_the_worlds.txt")


def test_eval_other_corpus(capsys, trained):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--corpus", "war_of_the_worlds",
                         "--backend", "numpy", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert Path(result["corpus"]).name == "war_of_the_worlds.txt"
    assert result["tokens"] > 1000
    assert 1 < result["perplexity"] < 28 + 1     # better than nothing, no worse than uniform over 28 tokens
    assert result["unknown_tokens"] == 0         # d2l preprocessing leaves only lower-case letters and spaces


def test_eval_all_split_covers_the_whole_corpus(capsys, trained):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--split", "all", "--backend", "numpy", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 170580 - 1   # the book's corpus length; max_tokens does not apply


# --- corpora -----------------------------------------------------------------------------------------

def test_corpora_json(capsys):
    code, out, err = run(capsys, "corpora", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["timemachine", "war_of_the_worlds", "tinyshakespeare"]
    for r in rows:
        if (DATA / f"{r['name']}.txt").is_file():
            assert r["sha256_ok"] is True and Path(r["path"]).parent == DATA


def test_corpora_text(capsys, tmp_path):
    code, out, err = run(capsys, "corpora")
    assert code == 0 and out.count("sha256 ok") == len(list(DATA.glob("*.txt")))
    bad = tmp_path / "dd"
    bad.mkdir()
    (bad / "timemachine.txt").write_text("wrong\n")
    code, out, err = run(capsys, "corpora", "--data-dir", bad)
    assert code == 0
    assert "timemachine" in out and "sha256 ok" in out      # the good copy further along the path is found


# --- bad input: one line on stderr, no traceback -----------------------------------------------------

def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD_CORPORA = {
    "missing": (None, "no such corpus or file"),
    "empty": (b"", "is empty"),
    "binary": (b"abc\x00\x01\x02def" * 10, "binary"),
    "latin1": ("the time traveller sat in his caf\xe9 ".encode("latin-1") * 10, "not valid UTF-8"),
    "too_short": (b"abcdefghijklmnopqrst", "needs at least"),
    "no_letters": (b"1234 5678 !!! ??? ...\n" * 20, "no tokens left"),        # under the book's d2l
    "only_control_characters": (b"\x07\x1b\x7f\xe2\x80\x8b" * 40, "no tokens left"),     # under unicode
}


@pytest.mark.parametrize("kind", list(BAD_CORPORA))
def test_train_bad_corpus_file(capsys, tmp_path, kind):
    data, fragment = BAD_CORPORA[kind]
    path = tmp_path / f"{kind}.txt"
    if data is not None:
        path.write_bytes(data)
    mode = ["--preprocess", "d2l"] if kind == "no_letters" else []
    code, out, err = run(capsys, "train", *TINY, *mode, "--corpus", path, "--out", tmp_path / "out")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_train_unknown_corpus_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", *TINY, "--corpus", "no_such_corpus")
    line = assert_one_line_error(code, err, "no_such_corpus")
    for name in ("timemachine", "war_of_the_worlds", "tinyshakespeare"):
        assert name in line


@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"),
    ("--num-hiddens", "-3"),
    ("--lr", "0"),
    ("--clip", "-1"),
    ("--val-fraction", "1.5"),
    ("--clip", "nan"),
    ("--seed", "-1"),
])
def test_train_bad_sizes(capsys, flag, value):
    code, out, err = run(capsys, "train", *tiny(**{flag[2:].replace("-", "_"): value}))
    assert_one_line_error(code, err, flag)


@pytest.mark.parametrize("argv", [
    ["train", "--batch-size", "abc"],
    ["train", "--backend", "tensorflow"],
    ["train", "--no-such-flag"],
    ["generate"],                                  # --checkpoint is required
    ["eval", "--split", "test", "--checkpoint", "x"],
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and "error:" in lines[0]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_missing_checkpoint(capsys, tmp_path, command):
    code, out, err = run(capsys, command, "--checkpoint", tmp_path / "nowhere", "--backend", "numpy")
    assert_one_line_error(code, err, "no checkpoint")


def _corrupt_meta(run_dir: Path) -> None:
    (run_dir / "checkpoint.json").write_bytes(b"\x8f\xff\x00\x13garbage{{")


def _not_json(run_dir: Path) -> None:
    (run_dir / "checkpoint.json").write_text('{"format": "rnnlab-checkpoint", ')


def _truncate_weights(run_dir: Path) -> None:
    w = weights_files(run_dir)[0]
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _flip_weights(run_dir: Path) -> None:
    w = weights_files(run_dir)[0]
    data = bytearray(w.read_bytes())
    for i in (len(data) // 3, len(data) - 5):
        data[i] ^= 0xFF
    w.write_bytes(bytes(data))


def _delete_weights(run_dir: Path) -> None:
    weights_files(run_dir)[0].unlink()


DAMAGE = {
    "garbage_meta": (_corrupt_meta, "unreadable JSON"),
    "truncated_meta": (_not_json, "unreadable JSON"),
    "truncated_weights": (_truncate_weights, "SHA-256 does not match"),
    "flipped_weights": (_flip_weights, "SHA-256 does not match"),
    "missing_weights": (_delete_weights, "is missing"),
}


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint(capsys, run_copy, command, damage):
    corrupt, fragment = DAMAGE[damage]
    corrupt(run_copy)
    code, out, err = run(capsys, command, "--checkpoint", run_copy, "--backend", "numpy")
    assert_one_line_error(code, err, "corrupt checkpoint", fragment)
    assert out == ""


def test_an_abrupt_interrupt_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    """A KeyboardInterrupt that is not the first Ctrl-C (which saves the current step) leaves the last
    checkpoint as it was, and the message says where that is."""
    from rnnlab import train as training
    real_steps, calls = training.epoch_steps, []

    def interrupted_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_steps(*args, **kwargs)

    monkeypatch.setattr(training, "epoch_steps", interrupted_on_third)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *tiny(num_epochs=5), "--out", out)
    assert code == 130 and "Traceback" not in err
    assert "interrupted at epoch 2;" in err and "is at epoch 2, step 38 (continue with --resume)" in err
    monkeypatch.setattr(training, "epoch_steps", real_steps)
    code, _, err = run(capsys, "train", *tiny(num_epochs=3), "--out", out, "--resume")
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]


def test_eval_train_split_is_what_the_model_trained_on(capsys, trained):
    code, out, err = run(capsys, "eval", "--checkpoint", trained.out, "--split", "train",
                         "--backend", "numpy", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 400 - 1          # --max-tokens 400, the first token has no context


def test_resume_with_overwrite_is_refused(capsys, run_copy):
    before = snapshot(run_copy)
    code, out, err = run(capsys, "train", *tiny(num_epochs=3), "--out", run_copy, "--resume", "--overwrite")
    assert_one_line_error(code, err, "--resume")
    assert snapshot(run_copy) == before


def test_unwritable_out_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = run(capsys, "train", *TINY, "--out", blocker / "sub")
    assert_one_line_error(code, err)


def test_bench_quick_reports_every_path_as_json(capsys):
    pytest.importorskip("torch")
    code, out, err = run(capsys, "bench", "--quick", "--repeats", "1", "--configs", "book", "word", "lstm",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"cpu", "cores", "torch"} <= set(result["machine"])
    for config in ("book", "word"):
        paths = result["train"][config]["paths"]
        assert {"book (baseline)", "torch autograd", "torch fused f32", "torch fused bf16"} <= set(paths)
        assert paths["book (baseline)"]["ratio"] == 1.0
        assert all(row["tokens_per_s"] > 0 for row in paths.values())
    assert result["train"]["word"]["config"]["V"] == 4580
    lstm = result["train"]["lstm"]
    assert {"torch autograd", "torch autograd bf16", "torch nn"} <= set(lstm["paths"])
    assert lstm["ratios_to"] == "torch autograd" and lstm["paths"]["torch autograd"]["ratio"] == 1.0
    assert lstm["config"]["cell"] == "lstm" and lstm["config"]["layers"] == 2
    roof = result["roofline"]["lstm"]
    assert roof["tokens_per_s_bound"] > 0 and roof["wide_matmul_gflops"] > 0
    jax_rows = {"rnnlab greedy, batch 1, jax loop", "lstm greedy, batch 1, jax loop"} if backends.jax_available() \
        else set()
    assert set(result["generate"]) == {"book predict_ch8 (greedy, batch 1)", "rnnlab greedy, batch 1",
                                       "rnnlab sampled, batch 1", "rnnlab sampled, 64 at once",
                                       "rnnlab top-k 10 top-p .9, 64", "rnnlab beam search, 8 beams",
                                       "lstm greedy, batch 1", "lstm sampled, 64 at once"} | jax_rows
    assert all(row["chars_per_s"] > 0 for row in result["generate"].values())
    many = result["generate"]["lstm sampled, 64 at once"]
    assert many["rows"] == 64 and many["bound_chars_per_s"] > 0 and many["roofline_fraction"] > 0
    assert many["flops_per_char"] == 2 * (3 * 384 * 4 * 384 + 384 * 28)
    assert all(row["peak_bytes_per_char"] > 0 for row in result["data"].values())


def test_bf16_training_runs_and_numpy_refuses_it(capsys, tmp_path):
    pytest.importorskip("torch")
    code, out, err = run(capsys, "train", *tiny(backend="torch"), "--matmul-dtype", "bfloat16", "--json")
    assert code == 0, err
    assert json.loads(out)["val_ppl"] < 30
    code, out, err = run(capsys, "train", *TINY, "--matmul-dtype", "bfloat16")
    assert_one_line_error(code, err, "numpy")


# --- models and training beyond the book ------------------------------------------------------------

DEEP = ["--cell", "lstm", "--num-layers", "2", "--embed-size", "6", "--dropout", "0.3", "--weight-drop", "0.2",
        "--init", "uniform", "--optimizer", "adam", "--lr", "0.01", "--schedule", "cosine", "--warmup-epochs", "1",
        "--weight-decay", "0.01", "--clip-mode", "value", "--clip", "0.5"]


@pytest.mark.parametrize("cell, dropout_mode", [("gru", "step"), ("lstm", "locked")])
def test_deep_run_resumes_exactly(capsys, tmp_path, cell, dropout_mode):
    """Adam moments, the schedule and the dropout and weight-drop masks all survive a resume: same numbers as
    a straight run, to the bit, on numpy."""
    argv = [*tiny(num_epochs=3), *DEEP, "--dropout-mode", dropout_mode]
    argv[argv.index("lstm")] = cell
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(capsys, "train", *argv, "--out", straight)[0] == 0
    # stopped by the budget at its first step, mid-epoch, then resumed: the cosine schedule's horizon stays 3
    # epochs, and the extra evaluation at the stop changes nothing that follows
    assert run(capsys, "train", *argv, "--time-budget", "1e-9", "--out", split)[0] == 0
    assert [r["step"] for r in read_metrics(split)] == [1]
    code, _, err = run(capsys, "train", *argv, "--time-budget", "0", "--out", split, "--resume")
    assert code == 0, err
    a, b = read_metrics(straight), read_metrics(split)[1:]
    assert [r["val_ppl"] for r in a] == [r["val_ppl"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert weights_files(straight)[0].read_bytes() == weights_files(split)[0].read_bytes()
    meta = json.loads((split / "checkpoint.json").read_text())
    assert meta["optimizer"]["name"] == "adam" and meta["optimizer"]["t"] > 0


def test_deep_checkpoint_generates_and_evaluates(capsys, tmp_path):
    out = tmp_path / "lstm"
    assert run(capsys, "train", *tiny(), *DEEP, "--out", out)[0] == 0
    texts = generate_json(capsys, out, "--num-chars", "12", "--num-samples", "2", "--temperature", "1",
                          "--prefix", "time traveller")
    assert len(texts) == 2 and all(len(t) == len("time traveller") + 12 for t in texts)
    code, stdout, err = run(capsys, "eval", "--checkpoint", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["perplexity"] == pytest.approx(read_metrics(out)[-1]["val_ppl"], rel=1e-6)


def test_best_checkpoint_and_early_stopping(capsys, tmp_path):
    out = tmp_path / "run"
    # lr 5 makes the held-out loss worse after the first epoch (without diverging)
    code, stdout, err = run(capsys, "train", *tiny(num_epochs=8, lr=5, clip=1), "--patience", "2",
                            "--out", out)
    assert code == 0, err
    records = read_metrics(out)
    vals = [r["val_ppl"] if r["val_ppl"] is not None else float("inf") for r in records]
    best = min(range(len(vals)), key=vals.__getitem__)
    assert len(records) == best + 3                            # stopped 2 evaluations after the best
    assert "early stop" in stdout
    assert json.loads((out / "best" / "checkpoint.json").read_text())["epoch"] == records[best]["epoch"]
    code, stdout, _ = run(capsys, "eval", "--checkpoint", out / "best", "--json")
    assert json.loads(stdout)["perplexity"] == pytest.approx(vals[best], rel=1e-6)


def test_time_budget_stops_and_saves(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", *tiny(num_epochs=50, log_every=10), "--time-budget", "1e-9",
                            "--out", out)
    assert code == 0, err
    assert "time budget" in stdout and "reached at epoch 1, minibatch 1 (step 1)" in stdout
    assert [(r["epoch"], r["step"]) for r in read_metrics(out)] == [(0, 1)]       # stopped at its first step


@pytest.mark.parametrize("argv, fragment", [
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--weight-drop", "-0.1"], "--weight-drop must be in [0, 1)"),
    (["--dropout-mode", "locked"], "give --dropout too"),
    (["--num-layers", "0"], "--num-layers must be positive"),
    (["--embed-size", "-1"], "--embed-size must be"),
    (["--cell", "gru", "--activation", "relu"], "applies to the rnn cell"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--matmul-dtype", "bfloat16", "--backend", "torch", "--dtype", "float64"], "needs --dtype float32"),
])
def test_bad_model_and_training_flags(capsys, tmp_path, argv, fragment):
    code, _, err = run(capsys, "train", *tiny(), *argv, "--out", tmp_path / "run")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_baseline_json_is_one_line_per_order(capsys):
    code, out, err = run(capsys, "baseline", "--order", "1", "3", "--preprocess", "letters",
                         "--max-tokens", "0", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["order"] for r in rows] == [1, 3]
    assert rows[0]["perplexity"] == pytest.approx(16.73, abs=0.01)   # the reference unigram figure, 16.7
    assert rows[1]["perplexity"] < rows[0]["perplexity"]


def test_baseline_uses_a_run_split(capsys, trained):
    code, out, err = run(capsys, "baseline", "--checkpoint", trained.out, "--order", "2", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["train_tokens"] == 400 and row["tokens"] == json.loads(trained.stdout)["val_tokens"]


def test_baseline_bad_order(capsys):
    assert_one_line_error(*run(capsys, "baseline", "--order", "0")[::2], "--order must be >= 1")


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_are_valid_configs(name):
    data, model, train_cfg = presets.apply(name, {}, {}, {})
    configs = DataConfig(**data), ModelConfig(**model), TrainConfig(**train_cfg)
    validate_sizes(*configs)
    if name == "book":
        assert configs == (DataConfig(), ModelConfig(), TrainConfig())


def test_flags_override_the_preset(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--preset", "timemachine", *tiny(), "--cell", "gru", "--num-layers", "1",
                       "--embed-size", "4", "--torch-impl", "autograd", "--time-budget", "0", "--out", out)
    assert code == 0, err
    cfg = json.loads((out / "checkpoint.json").read_text())["config"]
    assert cfg["data"]["preprocess"] == "letters"                 # from the preset
    assert cfg["model"]["cell"] == "gru" and cfg["model"]["num_hiddens"] == 16      # from the flags
    assert cfg["train"]["optimizer"] == "adam" and cfg["train"]["num_epochs"] == 2
