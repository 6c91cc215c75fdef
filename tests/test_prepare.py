"""Prepared text (`rnnlab prepare TEXT --out DIR`, `rnnlab train --data DIR`): the tokens, vocabulary and split
equal what `runstate.load_dataset` builds in RAM, on the real corpora in every mode and on arbitrary texts cut
into chunks of any size; training from the token file gives the run `--corpus` gives, resumes exactly and is
read with np.memmap; a damaged directory, a checkpoint that trained on other tokens and every bad input end in
one clear line, and nothing a user had is lost."""
import json
import os
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnlab import checkpoint, prepare, prepared, text
from rnnlab.config import DataConfig
from rnnlab.errors import RnnlabError
from rnnlab.lm import LM
from rnnlab.runstate import load_dataset

from conftest import DATA  # noqa: E402
from helpers import one_line_error, run_cli as run

CORPORA = ("timemachine", "war_of_the_worlds", "tinyshakespeare")
TINY = ["--num-hiddens", "8", "--batch-size", "4", "--num-steps", "8", "--max-tokens", "1500", "--log-every", "1",
        "--backend", "numpy", "--quiet", "--preset", "book"]


pytestmark = pytest.mark.usefixtures("needs_corpora")


def assert_same(got, expected):
    """Two datasets (or (tokens, vocab) pairs) hold the same tokens, dtype, vocabulary and counts."""
    assert got.vocab.idx_to_token == expected.vocab.idx_to_token
    assert got.vocab.token_freqs == expected.vocab.token_freqs
    for a, b in ((got.train, expected.train), (got.val, expected.val)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


# --- exactness ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("corpus", CORPORA)
@pytest.mark.parametrize("mode", prepare.MODES)
def test_prepared_chars_equal_the_dataset_built_in_ram(tmp_path, corpus, mode):
    for chunk in (prepare.CHUNK, 4099):            # one chunk, and cuts inside lines and runs of non-letters
        prepare.prepare(corpus, tmp_path / "p", mode, "char", 0.1, overwrite=True, chunk_size=chunk)
        ram = load_dataset(DataConfig(corpus=corpus, preprocess=mode, max_tokens=0))
        assert_same(load_dataset(DataConfig(prepared=str(tmp_path / "p"), max_tokens=0)), ram)


@pytest.mark.parametrize("corpus", CORPORA[:2])
@pytest.mark.parametrize("mode", prepare.MODES)
def test_prepared_words_equal_the_dataset_built_in_ram(tmp_path, corpus, mode):
    prepare.prepare(corpus, tmp_path / "p", mode, "word", 0.1, chunk_size=5003)
    ram = load_dataset(DataConfig(corpus=corpus, preprocess=mode, token="word", max_tokens=0))
    got = load_dataset(DataConfig(prepared=str(tmp_path / "p"), max_tokens=0))
    assert_same(got, ram)
    assert got.train.dtype == np.uint16


PIECES = ["a", "b", "Z", "q", " ", "  ", "\n", "\r", "\r\n", "\t", "\x0b", "\x0c", "\x01", "\x7f", ",", ".", "7",
          "\x85", "\u2028", "é", "e\u0301", "\u0301", "\u00ad", "\u200b", "\ufeff", "ß", "Ω", "\u2126", "中", "😀"]
TEXTS = st.one_of(st.lists(st.sampled_from(PIECES), max_size=120).map("".join),
                  st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=80))
BOUNDED = settings(max_examples=150, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@BOUNDED
@given(raw=TEXTS, bom=st.booleans(), mode=st.sampled_from(prepare.MODES),
       token=st.sampled_from(text.TOKEN_TYPES), chunk=st.integers(1, 40))
def test_any_text_cut_into_any_chunks_prepares_as_it_loads(raw, bom, mode, token, chunk):
    """Cuts after a line break, between two letters, a piece grown past the chunk size, a BOM, a decomposed
    accent, '\\r' and '\\n' on either side of a cut: the tokens and vocabulary of the whole text."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_bytes((("\ufeff" if bom else "") + raw).encode("utf-8"))
        read = (("\ufeff" if bom else "") + raw).removeprefix("\ufeff")      # as corpora.read_text reads it
        try:
            expected = text.load_corpus(read, mode, token)
        except RnnlabError:
            expected = None
        if not read or expected is None or int(len(expected[0]) * 0.5) < 2:
            with pytest.raises(RnnlabError):
                prepare.prepare(path, Path(tmp) / "p", mode, token, 0.5, chunk_size=chunk)
            assert not (Path(tmp) / "p").exists()
            return
        prepare.prepare(path, Path(tmp) / "p", mode, token, 0.5, chunk_size=chunk)
        got = prepared.load(Path(tmp) / "p")
        corpus, vocab = expected
        assert got.vocab.idx_to_token == vocab.idx_to_token and got.vocab.token_freqs == vocab.token_freqs
        assert got.tokens.dtype == corpus.dtype and np.array_equal(got.tokens, corpus)


def test_unicode_removes_control_characters_before_it_joins_cr_and_lf():
    raw = "a\r\x00\nb\r\x0bc\x7f\r\r\nd"
    expected = text.preprocess(raw, "unicode")
    corpus, vocab = text.load_corpus(raw, "unicode")
    assert expected == "a\nb\n\nc\n\nd" and text.decode(corpus, vocab) == expected


def test_a_text_that_is_not_utf8_past_the_first_chunk_names_the_byte(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abc\n" * 100 + b"x\xffy\n")
    with pytest.raises(RnnlabError) as from_ram:
        load_dataset(DataConfig(corpus=str(path)))
    with pytest.raises(RnnlabError) as prepared_error:
        prepare.prepare(path, tmp_path / "p", chunk_size=16)
    assert str(prepared_error.value) == str(from_ram.value) and "byte 401" in str(from_ram.value)


# --- training from the token file ------------------------------------------------------------------------

def test_the_dataset_is_read_from_disk_not_copied(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes((DATA / "tinyshakespeare.txt").read_bytes() * 8)          # 8.9 MB
    prepare.prepare(path, tmp_path / "p", "raw")
    tracemalloc.start()
    try:
        ds = load_dataset(DataConfig(prepared=str(tmp_path / "p"), max_tokens=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds.train) + len(ds.val) == path.stat().st_size and peak < 3 << 20
    for part in (ds.train, ds.val):
        assert not part.flags.owndata and not part.flags.writeable
        base = part
        while not isinstance(base, np.memmap):
            base = base.base
        assert Path(base.filename).name.startswith("tokens-")


def params_of(run_dir):
    return checkpoint.load(run_dir).params


@pytest.mark.parametrize("mode, sampling", [("d2l", "sequential"), ("raw", "random")])
def test_train_data_gives_the_run_train_corpus_gives(tmp_path, mode, sampling):
    code, _, err = run("prepare", "war_of_the_worlds", "--out", tmp_path / "p", "--preprocess", mode, "--quiet")
    assert code == 0, err
    flags = [*TINY, "--num-epochs", "2", "--sampling", sampling, "--json"]
    code, from_dir, err = run("train", "--data", tmp_path / "p", *flags, "--out", tmp_path / "a")
    assert code == 0, err
    code, from_text, err = run("train", "--corpus", "war_of_the_worlds", "--preprocess", mode, *flags,
                               "--prefixes", *json.loads(from_dir)["samples"], "--out", tmp_path / "b")
    assert code == 0, err
    a, b = json.loads(from_dir), json.loads(from_text)
    for key in ("train_ppl", "val_ppl", "val_tokens", "step", "samples"):
        assert a[key] == b[key], key
    for name, value in params_of(tmp_path / "a").items():
        assert np.array_equal(value, params_of(tmp_path / "b")[name]), name
    for args in ([], ["--corpus", "war_of_the_worlds"]):
        assert run("eval", "--checkpoint", tmp_path / "a", *args)[1] == run("eval", "--checkpoint",
                                                                           tmp_path / "b")[1]


def test_a_run_on_a_prepared_text_resumes_exactly(tmp_path):
    assert run("prepare", "timemachine", "--out", tmp_path / "p", "--preprocess", "letters")[0] == 0
    flags = [*TINY, "--sampling", "random", "--data", tmp_path / "p"]
    assert run("train", *flags, "--num-epochs", "3", "--out", tmp_path / "straight")[0] == 0
    assert run("train", *flags, "--num-epochs", "1", "--out", tmp_path / "half")[0] == 0
    code, _, err = run("train", "--resume", "--out", tmp_path / "half", "--num-epochs", "3", "--quiet")
    assert code == 0, err
    for name, value in params_of(tmp_path / "straight").items():
        assert np.array_equal(value, params_of(tmp_path / "half")[name]), name
    saved = json.loads((tmp_path / "half" / "checkpoint.json").read_text())
    assert saved["config"]["data"]["prepared"] == str((tmp_path / "p").resolve())
    assert saved["config"]["data"]["preprocess"] == "letters"
    assert saved["prepared_tokens_sha256"] == prepared.read_meta(tmp_path / "p")["tokens_sha256"]


def test_a_moved_prepared_text_is_given_with_data_and_a_different_one_is_refused(tmp_path):
    assert run("prepare", "timemachine", "--out", tmp_path / "p", "--preprocess", "d2l")[0] == 0
    assert run("train", *TINY, "--num-epochs", "1", "--data", tmp_path / "p", "--out", tmp_path / "r")[0] == 0
    os.rename(tmp_path / "p", tmp_path / "moved")
    one_line_error(*run("train", "--resume", "--out", tmp_path / "r", "--num-epochs", "2")[::2],
                   "no prepared text at", "--data DIR")
    one_line_error(*run("eval", "--checkpoint", tmp_path / "r")[::2], "no prepared text at")
    code, _, err = run("train", "--resume", "--out", tmp_path / "r", "--num-epochs", "2", "--quiet",
                       "--data", tmp_path / "moved")
    assert code == 0, err
    assert LM.load(tmp_path / "r").generate("the", num_preds=5)              # generating reads no corpus
    assert run("prepare", "war_of_the_worlds", "--out", tmp_path / "other", "--preprocess", "d2l")[0] == 0
    one_line_error(*run("train", "--resume", "--out", tmp_path / "r", "--num-epochs", "3",
                        "--data", tmp_path / "other")[::2], "does not hold the prepared text")
    assert run("prepare", "timemachine", "--out", tmp_path / "moved", "--preprocess", "raw", "--overwrite")[0] == 0
    # the resumed run recorded the directory's new place, which now holds other tokens
    one_line_error(*run("eval", "--checkpoint", tmp_path / "r")[::2], "does not hold the prepared text")
    one_line_error(*run("train", "--resume", "--out", tmp_path / "r", "--num-epochs", "3",
                        "--data", tmp_path / "moved")[::2], "does not hold the prepared text")
    one_line_error(*run("train", "--init-from", tmp_path / "r", "--num-epochs", "1", "--no-save",
                        "--data", tmp_path / "moved")[::2], "is not the model's")


@pytest.mark.parametrize("flags, fragment", [
    (["--preprocess", "raw"], "--preprocess raw differs from"),
    (["--val-fraction", "0.2"], "--val-fraction 0.2 differs from"),
    (["--token", "word"], "--token word differs from"),
    (["--corpus", "timemachine"], "give one of them"),
])
def test_a_flag_that_contradicts_the_prepared_text_is_refused(tmp_path, flags, fragment):
    assert run("prepare", "timemachine", "--out", tmp_path / "p", "--preprocess", "d2l")[0] == 0
    one_line_error(*run("train", "--data", tmp_path / "p", "--no-save", *flags)[::2], fragment)


# --- a damaged prepared directory ----------------------------------------------------------------------------

def _cut_short(p: Path):
    tokens = next(p.glob("tokens-*.bin"))
    os.chmod(tokens, 0o644)
    with open(tokens, "r+b") as f:
        f.truncate(tokens.stat().st_size - 1)


def _changed(p: Path):
    tokens = next(p.glob("tokens-*.bin"))
    os.chmod(tokens, 0o644)
    data = bytearray(tokens.read_bytes())
    data[100] = (data[100] + 1) % 28
    tokens.write_bytes(bytes(data))


def _edit(p: Path, change, checksum=False):
    meta = json.loads((p / "prepared.json").read_text())
    change(meta)
    if checksum:
        meta["checksum"] = prepared._checksum(meta)
    (p / "prepared.json").write_text(json.dumps(meta))


def _swap_two_tokens(meta: dict):
    tokens = meta["vocab"]["idx_to_token"]
    tokens[1], tokens[2] = tokens[2], tokens[1]


def _linked(p: Path):
    tokens = next(p.glob("tokens-*.bin"))
    os.rename(tokens, p / "elsewhere.bin")
    os.symlink(p / "elsewhere.bin", tokens)


DAMAGE = {
    "token file cut short": (_cut_short, "cut short"),
    "token file changed": (_changed, "does not match the SHA-256"),
    "token file missing": (lambda p: os.remove(next(p.glob("tokens-*.bin"))), "cannot be read"),
    "token file a link": (_linked, "not a regular file"),
    "json edited": (lambda p: _edit(p, lambda m: m.update(val_fraction=0.2)), "changed after rnnlab prepare"),
    "vocabulary reordered": (lambda p: _edit(p, _swap_two_tokens, True), "does not match its token_freqs"),
    "wrong dtype": (lambda p: _edit(p, lambda m: m.update(dtype="uint16"), True), "dtype must be uint8"),
    "split edited": (lambda p: _edit(p, lambda m: m.update(num_val=5), True), "num_val must be"),
    "not json": (lambda p: (p / "prepared.json").write_text("{"), "unreadable JSON"),
    "json missing": (lambda p: os.remove(p / "prepared.json"), "has no prepared.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_prepared_text_is_one_line(tmp_path, damage):
    assert run("prepare", "timemachine", "--out", tmp_path / "p", "--preprocess", "d2l")[0] == 0
    do, fragment = DAMAGE[damage]
    do(tmp_path / "p")
    one_line_error(*run("train", "--data", tmp_path / "p", *TINY, "--no-save")[::2], fragment)


# --- writing safely ----------------------------------------------------------------------------------------

def test_prepare_never_replaces_what_it_did_not_write(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_line_error(*run("prepare", "timemachine", "--out", other)[::2], "holds no prepared text")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert run("prepare", "timemachine", "--out", tmp_path / "p")[0] == 0
    (tmp_path / "p" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (tmp_path / "p").iterdir())
    one_line_error(*run("prepare", "timemachine", "--out", tmp_path / "p", "--preprocess", "d2l")[::2],
                   "--overwrite replaces it")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == before
    (tmp_path / "p" / ".tokens.abc.tmp").write_text("left by a killed prepare")
    assert run("prepare", "timemachine", "--out", tmp_path / "p", "--preprocess", "d2l", "--overwrite")[0] == 0
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert [n for n in names if n.startswith("tokens-")] == [prepared.read_meta(tmp_path / "p")["tokens_file"]]
    assert "notes.txt" in names and ".tokens.abc.tmp" not in names
    assert prepared.load(tmp_path / "p").meta["preprocess"] == "d2l"


def test_a_prepare_that_fails_midway_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    prepare.prepare("timemachine", tmp_path / "p", "d2l")
    before = {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(prepare, "_encode_pass", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare("tinyshakespeare", tmp_path / "p", "raw", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()} == before
    with monkeypatch.context() as m:          # killed between the new token file and prepared.json
        m.setattr(prepare, "atomic_write_json", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare("tinyshakespeare", tmp_path / "p", "raw", overwrite=True)
    assert prepared.load(tmp_path / "p").meta["preprocess"] == "d2l"
    assert len(list((tmp_path / "p").glob("tokens-*.bin"))) == 2
    prepare.prepare("war_of_the_worlds", tmp_path / "p", "letters", overwrite=True)
    left = [p.name for p in (tmp_path / "p").glob("tokens-*.bin")]
    assert left == [prepared.load(tmp_path / "p").meta["tokens_file"]]           # the orphan too is gone


def _write(name, data: bytes):
    def make(tmp_path):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


BAD_TEXTS = {
    "missing": (lambda tmp: tmp / "nope.txt", "no such corpus or file"),
    "a directory": (lambda tmp: tmp, "is not a file"),
    "empty": (_write("e.txt", b""), "is empty"),
    "only a BOM": (_write("b.txt", b"\xef\xbb\xbf"), "holds only a byte-order mark"),
    "binary": (_write("bin.txt", b"ab\x00cd" * 10), "looks binary"),
    "not UTF-8": (_write("l1.txt", "caf\xe9 au lait\n".encode("latin-1") * 5), "is not valid UTF-8 (byte 3"),
    "too short": (_write("s.txt", b"abc\n"), "at least 2 are needed"),
    "no tokens left": (_write("p.txt", b"123 ... !!!\n"), "no tokens left after 'd2l' preprocessing"),
}


@pytest.mark.parametrize("bad", BAD_TEXTS)
def test_a_bad_text_is_one_line_and_leaves_nothing(tmp_path, bad):
    make, fragment = BAD_TEXTS[bad]
    one_line_error(*run("prepare", make(tmp_path), "--out", tmp_path / "out", "--preprocess", "d2l")[::2],
                   fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--preprocess", "legacy"], "legacy cannot be prepared"),
    (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["--out", ""], "--out is empty"),
])
def test_bad_prepare_flags_are_one_line(tmp_path, args, fragment):
    one_line_error(*run("prepare", "timemachine", "--out", tmp_path / "out", *args)[::2], fragment)


def test_prepare_reports_what_it_made(tmp_path):
    code, out, err = run("prepare", "timemachine", "--out", tmp_path / "p", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["tokens"], report["vocab_size"], report["dtype"]) == (178_979, 71, "uint8")
    assert report["train_tokens"] + report["val_tokens"] == report["tokens"] and report["mb_per_s"] > 0
    code, out, _ = run("prepare", "timemachine", "--out", tmp_path / "q", "--preprocess", "d2l")
    assert out.startswith("prepared timemachine.txt in ") and "170,580 tokens" in out
    assert f"rnnlab train --data {tmp_path / 'q'}" in out


@pytest.mark.slow
def test_a_text_of_many_chunks_prepares_as_it_loads(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"".join((DATA / f"{c}.txt").read_bytes() for c in CORPORA) * 40)    # 65 MB
    for mode in ("d2l", "unicode"):
        prepare.prepare(path, tmp_path / mode, mode)
        ram = load_dataset(DataConfig(corpus=str(path), preprocess=mode, max_tokens=0))
        assert_same(load_dataset(DataConfig(prepared=str(tmp_path / mode), max_tokens=0)), ram)
