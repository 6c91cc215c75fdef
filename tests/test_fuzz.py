"""Property-based fuzzing (hypothesis) of everything that reads what a user gives: the text pipeline, the
minibatch samplers, and the command line on arbitrary corpus files and prompts.

The properties: preprocessing, the vocabulary and encoding agree with their definitions on any Unicode text
(the vectorised ASCII path with the general one, at any chunk size); every minibatch is (B, T) with Y the
tokens that follow X; and every command ends with exit status 0, or 1 or 2 with exactly one line on stderr,
never a traceback. Each property is bounded (at most a few hundred examples) so the file runs in seconds.
"""
import contextlib
import io
import json
import unicodedata
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rnnlab import ascii_chars, cli, samplers, text
from rnnlab.errors import RnnlabError

from conftest import DATA  # noqa: E402

BOUNDED = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FAST = settings(max_examples=200, **BOUNDED)
SLOW = settings(max_examples=100, **BOUNDED)

MODES = st.sampled_from(text.PREPROCESS_MODES)
TOKENS = st.sampled_from(text.TOKEN_TYPES)
# any Unicode text (no lone surrogates: a file decoded from UTF-8 holds none), ASCII-heavy or not
UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
ASCII = st.text(st.characters(max_codepoint=127), max_size=200)
WORDY = st.text(st.sampled_from("abcXYZ \n\r\t.,-'é"), max_size=300)
TEXTS = st.one_of(UNICODE, ASCII, WORDY)


# --- the text pipeline -------------------------------------------------------------------------------

@FAST
@given(raw=TEXTS, mode=MODES, token=TOKENS)
def test_preprocess_keeps_only_what_the_mode_allows(raw, mode, token):
    out = text.preprocess(raw, mode, token)
    if mode == "raw":
        assert out == raw.replace("\r\n", "\n").replace("\r", "\n")
    elif mode == "legacy":
        assert out == out.strip() and "  " not in out and not any(c.isspace() and c != " " for c in out)
        assert out.split() == raw.lower().split()
    elif mode == "unicode":
        assert unicodedata.is_normalized("NFC", out) and "\r" not in out
        assert all(c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf") for c in out)
        breaks = "\r" + text.LINE_BREAKS
        kept = "".join(c for c in raw if c in breaks or unicodedata.category(c) not in ("Cc", "Cf") or c in "\n\t")
        kept = "".join("\n" if c in breaks else c for c in kept.replace("\r\n", "\n"))
        assert out == unicodedata.normalize("NFC", kept)
    else:
        assert set(out) <= set("abcdefghijklmnopqrstuvwxyz ")
        assert out.replace(" ", "") == "".join(c.lower() for c in raw if c.isascii() and c.isalpha())


@FAST
@given(raw=TEXTS, mode=MODES, token=TOKENS)
def test_load_corpus_encodes_the_preprocessed_tokens(raw, mode, token):
    tokens = text.tokenize(text.preprocess(raw, mode, token), token)
    try:
        corpus, vocab = text.load_corpus(raw, mode, token)
    except RnnlabError as e:
        assert len(tokens) == 0 and "no tokens left" in str(e)
        return
    assert corpus.ndim == 1 and len(corpus) == len(tokens) and corpus.dtype == text.index_dtype(len(vocab))
    assert vocab.idx_to_token[0] == "<unk>" and len(set(vocab.idx_to_token)) == len(vocab)
    assert vocab.to_tokens(corpus) == [t if t in vocab.token_to_idx else "<unk>" for t in tokens]
    assert text.decode(corpus, vocab, token) == ("" if token == "char" else " ").join(tokens)
    freqs = [f for _, f in vocab.token_freqs]
    assert freqs == sorted(freqs, reverse=True) and sum(freqs) == len(tokens)


@FAST
@given(raw=st.one_of(ASCII, WORDY.filter(str.isascii)), mode=MODES, chunk=st.integers(1, 16))
def test_the_ascii_fast_path_matches_the_general_one_at_any_chunk_size(raw, mode, chunk, monkeypatch):
    monkeypatch.setattr(ascii_chars, "CHUNK", chunk)        # every chunk boundary a long text would have
    tokens = text.preprocess(raw, mode, "char")
    assume(tokens)
    corpus, vocab = text.load_corpus(raw, mode, "char")
    expected = text.Vocab(tokens)
    assert vocab.idx_to_token == expected.idx_to_token and vocab.token_freqs == expected.token_freqs
    np.testing.assert_array_equal(corpus, text.encode(tokens, expected))


@FAST
@given(known=UNICODE, raw=UNICODE, chunk=st.integers(1, 64))
def test_encode_decode_round_trip(known, raw, chunk, monkeypatch):
    monkeypatch.setattr(text, "_CHUNK", chunk)
    vocab = text.Vocab(known)
    ids = text.encode(raw, vocab)
    assert len(ids) == len(raw)
    assert text.decode(ids, vocab) == "".join(c if c in vocab.token_to_idx else "<unk>" for c in raw)
    own = text.Vocab(raw)
    assert text.decode(text.encode(raw, own), own) == raw
    words = raw.split()
    assert text.decode(text.encode(words, text.Vocab(words)), text.Vocab(words), "word") == " ".join(words)


@FAST
@given(tokens=st.lists(st.text(max_size=3), max_size=50), min_freq=st.integers(0, 3),
       reserved=st.lists(st.sampled_from(["<pad>", "<bos>", "<eos>"]), unique=True))
def test_vocab_maps_tokens_to_indices_and_back(tokens, min_freq, reserved):
    vocab = text.Vocab(tokens, min_freq, reserved)
    assert vocab.idx_to_token[: 1 + len(reserved)] == ["<unk>", *reserved]
    assert len(set(vocab.idx_to_token)) == len(vocab)
    for tok in tokens:
        idx = vocab[tok]
        assert vocab.to_tokens(idx) == tok or (idx == vocab.unk and (tokens.count(tok) < min_freq
                                                                     or tok == "<unk>"))
    rebuilt = text.Vocab.from_tokens_list(vocab.idx_to_token, vocab.token_freqs)
    assert rebuilt.token_to_idx == vocab.token_to_idx and rebuilt.token_freqs == vocab.token_freqs


# --- the samplers -------------------------------------------------------------------------------------

@FAST
@given(n=st.integers(0, 400), batch_size=st.integers(0, 12), num_steps=st.integers(0, 12),
       sampling=st.sampled_from(samplers.SAMPLINGS), seed=st.integers(0, 2 ** 32))
def test_every_minibatch_is_b_by_t_and_y_follows_x(n, batch_size, num_steps, sampling, seed):
    corpus = np.arange(n, dtype=np.int64)                    # token value = its position in the corpus
    try:
        batches = list(samplers.batches(corpus, batch_size, num_steps, sampling, np.random.default_rng(seed)))
    except (RnnlabError, ValueError) as e:
        assert batch_size < 1 or num_steps < 1, e
        return
    assert batch_size >= 1 and num_steps >= 1
    for X, Y in batches:
        assert X.shape == Y.shape == (batch_size, num_steps) and X.dtype == Y.dtype == np.int64
        np.testing.assert_array_equal(Y, X + 1)
        assert Y.max() < n
    if n >= samplers.min_tokens(batch_size, num_steps, sampling):
        assert batches, "min_tokens promises at least one minibatch"
    if sampling == "sequential":
        for (X0, _), (X1, _) in zip(batches, batches[1:]):
            np.testing.assert_array_equal(X1[:, 0], X0[:, -1] + 1)   # row b continues row b
    else:
        starts = [int(s) for X, _ in batches for s in X[:, 0]]
        assert len(set(starts)) == len(starts)                          # disjoint within the epoch


# --- the command line on arbitrary files and prompts ---------------------------------------------------

def run(*argv) -> tuple[int, str, str]:
    """cli.main in process: (exit code, stdout, stderr); a usage error's SystemExit becomes its code. No
    RuntimeWarning (overflow, division by zero) may escape either."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, out: str, err: str, json_lines: bool = False) -> None:
    """Exit 0 (with strict JSON on stdout when asked), or 1 / 2 with exactly one line on stderr."""
    assert "Traceback" not in err
    if code == 0:
        if json_lines:
            for line in out.splitlines():
                json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
        return
    assert code in (1, 2), (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnlab"), err


def _truncated_utf8(s: str) -> bytes:
    data = s.encode("utf-8")
    return data[:-1] if data and len(s.encode("utf-8")) > len(s) else data + b"\xe2\x82"


WORDS = st.lists(st.sampled_from(["the", "Time", "<unk>", "Zeit", "ça", "時間", "\n", "42", "-", "\r\n"]),
                 min_size=20, max_size=200).map(" ".join)
FILE_BYTES = st.one_of(
    st.binary(max_size=600),
    UNICODE.map(lambda s: s.encode("utf-8")),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=30, max_size=300).map(str.encode),
    WORDY.map(lambda s: s.encode("utf-8")),
    st.text(st.sampled_from("abcXYZ \n\r\t.,-'é"), min_size=60, max_size=400).map(str.encode),
    WORDS.map(str.encode),
    st.text(st.characters(min_codepoint=0x80, exclude_categories=("Cs",)), min_size=1, max_size=50)
    .map(_truncated_utf8),
    st.just(b""),
    st.tuples(WORDY, st.integers(0, 300)).map(lambda t: (t[0][:t[1]] + "\x00" + t[0][t[1]:]).encode("utf-8")),
    st.integers(40, 200).map(lambda k: b"the time traveller said so\n" * k),
)


@SLOW
@given(data=FILE_BYTES, mode=MODES, token=TOKENS, order=st.integers(1, 6))
def test_baseline_on_any_file(tmp_path, data, mode, token, order):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    code, out, err = run("baseline", "--corpus", path, "--order", order, "--preprocess", mode, "--token", token,
                         "--max-tokens", "0", "--json")
    assert_clean(code, out, err, json_lines=True)


@settings(max_examples=150, **BOUNDED)
@given(data=FILE_BYTES, mode=MODES, token=TOKENS, cell=st.sampled_from(["rnn", "gru", "lstm"]),
       sampling=st.sampled_from(samplers.SAMPLINGS))
def test_train_on_any_file(tmp_path, data, mode, token, cell, sampling):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    code, out, err = run("train", "--corpus", path, "--preprocess", mode, "--token", token, "--cell", cell,
                         "--sampling", sampling, "--num-hiddens", "4", "--batch-size", "2", "--num-steps", "3",
                         "--num-epochs", "1", "--num-preds", "5", "--backend", "numpy", "--quiet", "--json")
    assert_clean(code, out, err, json_lines=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny trained runs: characters of The Time Machine (d2l), raw Unicode characters, and words."""
    base = tmp_path_factory.mktemp("fuzz")
    unicode_text = base / "unicode.txt"
    unicode_text.write_text("Zeit, Straße, время, 時間 — ça va? " * 40)
    runs = {"d2l": ["--corpus", "timemachine"], "raw": ["--corpus", unicode_text, "--preprocess", "raw"],
            "word": ["--corpus", "timemachine", "--token", "word", "--preprocess", "letters"]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RNNLAB_DATA", str(DATA))
        mp.setenv("XDG_CACHE_HOME", str(base / "cache"))
        for name, argv in runs.items():
            code, _, err = run("train", *argv, "--num-hiddens", "8", "--batch-size", "2", "--num-steps", "4",
                               "--max-tokens", "300", "--num-epochs", "1", "--backend", "numpy", "--quiet",
                               "--out", base / name)
            assert code == 0, err
    return {name: SimpleNamespace(out=base / name, **_vocab_and_data(base / name)) for name in runs}


def _vocab_and_data(out) -> dict:
    meta = json.loads((out / "checkpoint.json").read_text())
    return {"vocab": set(meta["vocab"]), "mode": meta["config"]["data"]["preprocess"],
            "token": meta["config"]["data"]["token"]}


def _shown_prefix(prefix: str, run) -> str:
    """The prefix as a sample starts: normalised and tokenized, shown as typed (unknown tokens too, reported in a
    note rather than printed as <unk>)."""
    tokens = text.tokenize(text.normalize_prefix(prefix, run.mode), run.token)
    return ("" if run.token == "char" else " ").join(tokens)


@SLOW
@given(data=FILE_BYTES, which=st.sampled_from(["d2l", "raw", "word"]), split=st.sampled_from(["val", "all"]))
def test_eval_on_any_file(tmp_path, checkpoints, data, which, split):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    code, out, err = run("eval", "--checkpoint", checkpoints[which].out, "--corpus", path, "--split", split,
                         "--backend", "numpy", "--json")
    assert_clean(code, out, err, json_lines=True)


PREFIXES = st.text(st.characters(), max_size=30)         # argv may carry lone surrogates (undecodable bytes)


@settings(max_examples=200, **BOUNDED)
@given(prefix=PREFIXES, which=st.sampled_from(["d2l", "raw", "word"]),
       temperature=st.sampled_from(["0", "1", "1e-310", "1e300"]), as_json=st.booleans())
def test_generate_on_any_prefix(checkpoints, prefix, which, temperature, as_json):
    argv = ["generate", "--checkpoint", checkpoints[which].out, "--prefix", prefix, "--num-chars", "4",
            "--num-samples", "2", "--temperature", temperature, "--backend", "numpy"]
    code, out, err = run(*argv, *(["--json"] if as_json else []))
    assert_clean(code, out, err, json_lines=as_json)
    if code == 0 and as_json:
        samples, shown = json.loads(out)["samples"], _shown_prefix(prefix, checkpoints[which])
        assert len(samples) == 2
        for sample in samples:
            assert sample.startswith(shown) and "<unk>" not in sample[len(shown):]      # never generated
