"""`rnnlab score`: per-character surprisal of any text, the same arithmetic as `rnnlab eval`, the model's true
top-K alternatives, its JSON, TSV and HTML forms, and one clear line for every bad input; and the readable
summaries `eval` and `baseline` print by default (`--json` for the figures as JSON)."""
import io
import json
import math
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

from rnnlab import cli, evaluate, scorepage
from rnnlab.config import DataConfig, ModelConfig
from rnnlab.fileio import dumps_json
from rnnlab.lm import LM, Scored
from rnnlab.text import Vocab

from helpers import one_line_error, run_cli as run
from conftest import DATA                 # the corpora folder: $RNNLAB_DATA or ../shared/data

TINY = ["--corpus", "timemachine", "--preprocess", "raw", "--num-hiddens", "16", "--num-epochs", "2",
        "--max-tokens", "2000", "--batch-size", "4", "--num-steps", "5", "--log-every", "1",
        "--backend", "numpy", "--dtype", "float64", "--quiet"]
TEXT = "The Time Traveller smiled.\n'Are you sure?' said the Psychologist."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny float64 numpy model of The Time Machine, every character kept (raw preprocessing)."""
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    out = tmp_path_factory.mktemp("score") / "run"
    code, _, err = run("train", *TINY, "--out", out)
    assert code == 0, err
    return out


def score_json(model, *argv) -> dict:
    code, out, err = run("score", "--checkpoint", model, "--backend", "numpy", "--json", *argv)
    assert code == 0, err
    return json.loads(out)


# --- the arithmetic of eval -----------------------------------------------------------------------------

def test_score_is_eval_on_the_same_text(model, tmp_path):
    text = (DATA / "timemachine.txt").read_text()[5000:7000]
    path = tmp_path / "passage.txt"
    path.write_text(text)
    scored = score_json(model, path)
    code, out, err = run("eval", "--checkpoint", model, "--backend", "numpy", "--corpus", path, "--split", "all",
                         "--json")
    assert code == 0, err
    ev = json.loads(out)
    s = scored["summary"]
    assert s["tokens"] == ev["tokens"] == len(text) - 1
    assert math.isclose(s["total_bits"], ev["bits_per_token"] * ev["tokens"], rel_tol=1e-9)
    assert math.isclose(s["perplexity"], ev["perplexity"], rel_tol=1e-9)
    assert "".join(r["token"] for r in scored["rows"]) == text
    # per character, evaluate.stream_nll: what eval sums
    lm = LM.load(model, "numpy")
    nll = evaluate.stream_nll(lm.backend, lm.read(text).ids)
    logprob = np.array([r["logprob"] for r in scored["rows"][1:]])
    np.testing.assert_allclose(-logprob, nll, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([r["bits"] for r in scored["rows"][1:]], nll / math.log(2), rtol=1e-9, atol=1e-12)


def test_score_reads_a_text_as_eval_does_under_the_books_preprocessing(tmp_path):
    """d2l strips each line and joins the lines with nothing between them: score reads a file so too."""
    out = tmp_path / "d2l"
    code, _, err = run("train", *TINY[:2], "--preprocess", "d2l", *TINY[4:], "--out", out)
    assert code == 0, err
    path = tmp_path / "lines.txt"
    path.write_text("The Time Traveller\r\n  smiled. 'Are you\nsure?' said the Psychologist.\n")
    scored = score_json(out, path)
    code, stdout, err = run("eval", "--checkpoint", out, "--backend", "numpy", "--corpus", path, "--split", "all",
                            "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    assert "".join(r["token"] for r in scored["rows"]) == "the time travellersmiled are yousure said the psychologist"
    assert scored["summary"]["tokens"] == ev["tokens"]
    assert math.isclose(scored["summary"]["perplexity"], ev["perplexity"], rel_tol=1e-9)


# --- the true top-K, from a model whose answer is known -----------------------------------------------------

def fake_lm(V: int = 7, seed: int = 0) -> tuple[LM, np.ndarray]:
    """An LM whose logits depend only on the token read: row i of a random (V, V) table, with a tie in row 1."""
    table = np.random.default_rng(seed).standard_normal((V, V)) * 2
    table[1, 2] = table[1, 3]

    def step(ids, state):
        return table[np.asarray(ids)], state

    backend = SimpleNamespace(decoder=lambda: step, begin_state=lambda b: np.zeros((1, b)))
    return LM(backend, Vocab("abcdef"), DataConfig(preprocess="raw"), ModelConfig()), table


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_the_alternatives_are_the_models_top_k_in_order(k):
    lm, table = fake_lm()
    text = "abcabfedcbaafd"
    scored = lm.score(text, top=k)
    ids = lm.prompt(text).ids
    assert len(scored.nll) == len(scored.top) == len(text) - 1
    for i, (nll, top) in enumerate(zip(scored.nll, scored.top)):
        p = softmax(table[ids[i]])
        assert nll == pytest.approx(-math.log(p[ids[i + 1]]), rel=1e-12)
        best = np.argsort(-p, kind="stable")[:k]
        assert [t for t, _ in top] == [lm.vocab.idx_to_token[j] for j in best]
        assert [q for _, q in top] == pytest.approx(p[best].tolist(), rel=1e-12)
        probs = [q for _, q in top]
        assert probs == sorted(probs, reverse=True)
    if k == 7:
        assert all(sum(q for _, q in top) == pytest.approx(1.0) for top in scored.top)


def test_a_character_the_vocabulary_lacks_is_reported_not_dropped():
    lm, _ = fake_lm()
    scored = lm.score("abzzéa")
    assert scored.unknown == {"z": 2, "é": 1} and "".join(scored.tokens) == "abzzéa"
    assert [r["unknown"] for r in scored.rows()] == [False, False, True, True, True, False]
    line = scorepage.unknown_line(scored)
    assert "'z' x2" in line and "'é' x1" in line and "<unk>" in line
    assert line in scorepage.summary_text(scored, "x")


# --- output forms ------------------------------------------------------------------------------------------

def test_json_has_the_summary_and_one_row_per_character(model):
    result = score_json(model, "--text", TEXT, "--top", 3)
    assert set(result) == {"source", "checkpoint", "epoch", "summary", "rows"}
    assert result["epoch"] == 2 and result["source"] == "the text given"
    s, rows = result["summary"], result["rows"]
    assert s["tokens"] == len(TEXT) - 1 and s["unknown"] == {}
    assert s["bits_per_char"] == pytest.approx(s["total_bits"] / s["tokens"])
    assert len(rows) == len(TEXT) and [r["index"] for r in rows] == list(range(len(TEXT)))
    assert rows[0]["logprob"] is None and rows[0]["top"] == []
    for r in rows[1:]:
        assert r["bits"] == pytest.approx(-r["logprob"] / math.log(2))
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)


def test_tsv_is_one_escaped_row_per_character(model):
    code, out, err = run("score", "--checkpoint", model, "--backend", "numpy", "--tsv", "--text", TEXT, "--top", 2)
    assert code == 0, err
    lines = out.rstrip("\n").split("\n")
    header = lines[0].split("\t")
    assert header == ["index", "char", "logprob", "bits", "top1", "p1", "top2", "p2"]
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == len(TEXT) and all(len(r) == len(header) for r in rows)
    assert rows[0][:4] == ["0", "T", "", ""]
    assert [r[1] for r in rows].count("\\n") == 1 and rows[TEXT.index("\n")][1] == "\\n"
    for r in rows[1:]:
        assert float(r[3]) == pytest.approx(-float(r[2]) / math.log(2), abs=3e-6)
        assert float(r[5]) >= float(r[7])


class Spans(HTMLParser):
    """The spans of the page's text (<pre class="text">): (class list, attributes, text)."""

    def __init__(self):
        super().__init__()
        self.spans, self.depth, self.current = [], 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "pre" and "text" in attrs.get("class", "").split():
            self.depth = 1
        elif tag == "span" and self.depth:
            self.current = [attrs.get("class", "").split(), attrs, ""]

    def handle_endtag(self, tag):
        if tag == "span" and self.current is not None:
            self.spans.append(tuple(self.current))
            self.current = None
        elif tag == "pre":
            self.depth = 0

    def handle_data(self, data):
        if self.current is not None:
            self.current[2] += data


def test_html_page_colours_each_character_and_is_self_contained(model, tmp_path):
    text = "a <script>alert('x')</script> & \"b\"\nc"
    page = tmp_path / "page.html"
    code, out, err = run("score", "--checkpoint", model, "--backend", "numpy", "--text", text, "--html", page)
    assert code == 0, err
    assert f"wrote {page}" in err and "bits/char" in out
    html = page.read_text()
    parser = Spans()
    parser.feed(html)
    spans = parser.spans
    assert len(spans) == len(text) and "".join(s[2] for s in spans) == text
    assert "x" in spans[0][0] and "c" not in spans[0][0]
    scored = [s for s in spans if "c" in s[0]]
    assert len(scored) == len(text) - 1 == len(spans[1:])
    rows = score_json(model, "--text", text)["rows"]
    for (classes, attrs, char), row in zip(scored, rows[1:]):
        assert float(attrs["data-bits"]) == pytest.approx(row["bits"], abs=1e-3)
        assert any(re.fullmatch(r"b\d", c) for c in classes)
        assert row["top"][0]["token"] in attrs["title"] or row["top"][0]["token"] == "\n"
    newline = spans[text.index("\n")]
    assert newline[2] == "\n" and "nl" in newline[0]
    assert sum("u" in s[0] for s in spans) == sum(row["unknown"] for row in rows) > 0   # '<' and '>'
    # nothing fetched, and the text's markup stays text
    assert not re.search(r"https?://|src=|<link|@import|url\(", html)
    assert html.count("<script") == 1 and "&lt;script&gt;" not in html      # one span per character
    assert "<span class=\"c b" in html and "&lt;</span>" in html
    assert "legend" in html and "bits/char" in html and "perplexity" in html


def test_the_summary_names_the_totals_and_the_most_surprising_places(model):
    code, out, err = run("score", "--checkpoint", model, "--backend", "numpy", "--text", TEXT)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"the text given: {len(TEXT)} characters, {len(TEXT) - 1} scored")
    assert "(epoch 2)" in lines[0]
    figures = score_json(model, "--text", TEXT)["summary"]
    assert lines[1] == (f"{figures['bits_per_char']:.3f} bits/char, perplexity {figures['perplexity']:.2f}, "
                        f"{figures['total_bits']:,.1f} bits in all")
    assert lines[2] == "most surprising:" and len(lines) == 3 + scorepage.SURPRISING
    assert all(re.match(r"\s+\d+\.\d\d bits  .*\[.+\].*\(expected '.+', \d+%\)$", line) for line in lines[3:])
    assert "\\n" in out                                   # the newline in a context is escaped, on one line


def test_unknown_characters_are_a_note_and_in_every_form(model, tmp_path):
    page = tmp_path / "page.html"
    code, out, err = run("score", "--checkpoint", model, "--backend", "numpy", "--text", "Café naïve", "--html", page)
    assert code == 0, err
    note = [line for line in err.splitlines() if "note" in line]
    assert len(note) == 1 and "'é' x1" in note[0] and "'ï' x1" in note[0] and "<unk>" in note[0]
    assert "<unk>" in out
    assert score_json(model, "--text", "Café naïve")["summary"]["unknown"] == {"é": 1, "ï": 1}
    parser = Spans()
    parser.feed(page.read_text())
    assert [s[2] for s in parser.spans if "u" in s[0]] == ["é", "ï"]


def test_stdin_and_a_file_read_the_same_text(model, tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + TEXT.encode("utf-8"))       # a byte-order mark is not text
    given = score_json(model, "--text", TEXT)
    monkeypatch.setattr("sys.stdin", SimpleNamespace(buffer=io.BytesIO(TEXT.encode("utf-8"))))
    from_stdin = score_json(model, "-")
    from_file = score_json(model, path)
    assert given["rows"] == from_stdin["rows"] == from_file["rows"]
    assert (from_stdin["source"], from_file["source"]) == ("stdin", "t.txt")


def test_max_chars_is_a_cap_not_a_cut(model):
    assert score_json(model, "--text", "abcdef", "--max-chars", 6)["summary"]["tokens"] == 5
    line = one_line_error(*run("score", "--checkpoint", model, "--text", "abcdefg", "--max-chars", 6)[::2],
                          "7 characters", "--max-chars 6", exit_code=1)
    assert line.startswith("rnnlab score: error:")


# --- bad input: one line ------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "ok.txt").write_text("some text")
    return tmp_path


BAD = [
    ([], "give the text to score as a FILE"),
    (["{d}/ok.txt", "--text", "ab"], "not both"),
    (["--text", "a"], "at least 2"),
    (["--text", ""], "--text is empty"),
    (["--text", "ab", "--top", "-1"], "--top must be between 0 and"),
    (["--text", "ab", "--top", "100000"], "--top must be between 0 and"),
    (["{d}/missing.txt"], "cannot read"),
    (["{d}/latin1.txt"], "not valid UTF-8"),
    (["{d}/empty.txt"], "is empty"),
    (["{d}"], "cannot read"),
    (["--text", "abc", "--html", "{d}/no/such/dir/page.html"], "--html"),
    (["--text", "abc", "--html", "{d}"], "is a directory"),
    (["--text", "abc", "--max-chars", "0"], "--max-chars must be >= 1"),
    (["--text", "abc", "--json", "--tsv"], "not allowed with"),
    (["--text", "abc", "--top", "x"], "--top"),
]


@pytest.mark.parametrize("argv, fragment", BAD)
def test_bad_input_is_one_line(model, files, argv, fragment):
    argv = [a.format(d=files) for a in argv]
    code, out, err = run("score", "--checkpoint", model, "--backend", "numpy", *argv)
    line = one_line_error(code, err, fragment)
    assert line.startswith("rnnlab score: error:") and out == ""
    assert not (files / "no").exists()


@pytest.mark.parametrize("data, fragment", [(b"", "stdin is empty"), (b"\xff\xfe", "stdin is not valid UTF-8")])
def test_bad_stdin_is_one_line(model, monkeypatch, data, fragment):
    monkeypatch.setattr("sys.stdin", SimpleNamespace(buffer=io.BytesIO(data)))
    one_line_error(*run("score", "--checkpoint", model, "-")[::2], fragment, exit_code=1)


def test_a_missing_checkpoint_is_one_line(tmp_path):
    one_line_error(*run("score", "--checkpoint", tmp_path / "nosuch", "--text", "abc")[::2], "no checkpoint")
    one_line_error(*run("score", "--text", "abc")[::2], "--checkpoint", exit_code=2)


# --- the formatting alone ----------------------------------------------------------------------------------

def test_shown_escapes_what_would_not_print():
    assert scorepage.shown("a\n\t\r\\b") == "a\\n\\t\\r\\\\b"
    assert scorepage.shown("\x0b\u2028é ") == "\\x0b\\u2028é "
    assert scorepage.shown("\udcff") == "\\udcff"


def test_an_impossible_token_and_a_word_model_format_without_error():
    scored = Scored(["the", "time", "<b>"], np.array([np.inf, 0.5]), [[("a", 1.0)], [("<b>", 0.6)]],
                    {"<b>": 1}, token="word")
    text = scorepage.summary_text(scored, "words")
    assert "inf bits" in text and "words: 3 words, 2 scored" in text and "bits/token" in text
    assert scorepage.tsv(scored).splitlines()[0].split("\t")[:2] == ["index", "token"]
    page = scorepage.html_page(scored, "words")
    parser = Spans()
    parser.feed(page)
    assert [s[2] for s in parser.spans] == ["the", "time", "<b>"] and "&lt;b&gt;" in page
    assert parser.spans[1][1]["data-bits"] == "inf"
    json.loads(dumps_json(scorepage.document(scored, "words")))


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 5)" in out and f"(default: {cli.SCORE_MAX_CHARS})" in out and "FILE" in out


# --- eval and baseline print a summary, and their JSON with --json ------------------------------------------

def test_eval_prints_a_readable_line_with_the_json_figures(model):
    code, out, err = run("eval", "--checkpoint", model, "--backend", "numpy")
    assert code == 0, err
    r = json.loads(run("eval", "--checkpoint", model, "--backend", "numpy", "--json")[1])
    assert out == (f"held-out perplexity {r['perplexity']:.2f}, {r['bits_per_char']:.3f} bits/char over "
                   f"{r['tokens']:,} characters of timemachine.txt (epoch 2)\n")


@pytest.mark.parametrize("argv, second", [(["--mix-ngram", "3"], "mixture: 0.5 x the model (perplexity"),
                                          (["--dynamic-lr", "0.1"], "dynamic evaluation: one SGD step of lr 0.1"),
                                          (["--split", "train"], None)])
def test_eval_describes_a_mixture_dynamic_evaluation_and_the_split(model, argv, second):
    code, out, err = run("eval", "--checkpoint", model, "--backend", "numpy", *argv)
    assert code == 0, err
    lines = out.splitlines()
    if second:
        assert len(lines) == 2 and lines[1].startswith(second)
        assert ("of the mixture" if "--mix-ngram" in argv else "with dynamic evaluation") in lines[0]
    else:
        assert len(lines) == 1 and lines[0].startswith("training-split perplexity ")
        assert "over 1,999 characters" in lines[0]


def test_baseline_prints_one_readable_line_per_order(model):
    code, out, err = run("baseline", "--checkpoint", model, "--order", 2, 3)
    assert code == 0, err
    rows = [json.loads(line) for line in run("baseline", "--checkpoint", model, "--order", 2, 3, "--json")[1]
            .splitlines()]
    assert out.splitlines() == [
        f"{r['order']}-gram Kneser-Ney: held-out perplexity {r['perplexity']:.2f}, {r['bits_per_char']:.3f} "
        f"bits/char over {r['tokens']:,} characters of timemachine.txt (fitted on 2,000)" for r in rows]
