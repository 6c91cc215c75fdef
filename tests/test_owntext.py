"""A user's own text: the BOM, unicode preprocessing, the preprocessing report, prompts from the text, and the
presets a run resolves to."""
import hashlib

import pytest

from rnnlab import backends, corpora, owntext, presets, text
from rnnlab.config import DataConfig, ModelConfig, TrainConfig, validate_sizes
from rnnlab.errors import RnnlabError

# --- a byte-order mark ------------------------------------------------------------------------------------


def test_a_leading_bom_is_dropped_and_the_hash_stays_the_files(tmp_path):
    path = tmp_path / "notes.txt"
    data = "\ufeffÉté\nhiver".encode("utf-8")
    path.write_bytes(data)
    raw, where, digest = corpora.load(str(path))
    assert raw == "Été\nhiver" and where == path and digest == hashlib.sha256(data).hexdigest()
    corpus, vocab = text.load_corpus(raw, "raw")
    assert "\ufeff" not in vocab.token_to_idx and len(corpus) == 9


def test_only_a_bom_is_an_empty_file(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(RnnlabError, match="only a byte-order mark"):
        corpora.read_text(path)


def test_a_bom_inside_the_text_stays_in_raw_and_goes_in_unicode():
    assert text.preprocess("a\ufeffb", "raw") == "a\ufeffb"
    assert text.preprocess("a\ufeffb", "unicode") == "ab"


# --- unicode preprocessing --------------------------------------------------------------------------------


def test_unicode_keeps_letters_accents_case_digits_and_punctuation():
    kept = "Ça va? «Ünïcödé» — 123, ΑΒΓ, Щука, 中文。\tEnd.\n"
    assert text.preprocess(kept, "unicode") == kept
    assert text.preprocess(kept, "unicode", "word") == kept
    assert text.normalize_prefix("Ça ", "unicode") == "Ça "


def test_unicode_composes_decomposed_letters_into_one_token():
    corpus, vocab = text.load_corpus("cafe\u0301 café", "unicode")
    assert text.decode(corpus, vocab) == "café café" and len(corpus) == 9
    assert "\u0301" not in vocab.token_to_idx and vocab.token_freqs[0] == ("c", 2)
    assert text.normalize_prefix("Cafe\u0301\u200b ", "unicode") == "Café "


def test_unicode_removes_control_and_format_characters_but_tab_and_newline():
    raw = "a\u200bb\u00adc\u200dd\ufeffe\x07f\x1bg\x92h\u2060i\tz\n"
    assert text.preprocess(raw, "unicode") == "abcdefghi\tz\n"
    assert text.preprocess("e\u00ad\u0301", "unicode") == "\u00e9"       # removed first, then composed


def test_unicode_turns_every_line_break_into_a_newline():
    assert text.preprocess("a\r\nb\rc\x0bd\x0ce\x85f\u2028g\u2029h", "unicode") == "a\nb\nc\nd\ne\nf\ng\nh"


def test_unicode_on_ascii_text_takes_the_fast_path_with_the_same_result():
    raw = "ab\x07c\x0cd\r\ne\x7f\x00f\tg"
    corpus, vocab = text.load_corpus(raw, "unicode")
    assert text.decode(corpus, vocab) == text.preprocess(raw, "unicode") == "abc\nd\nef\tg"
    assert corpus.dtype.name == "uint8"


# --- what a preprocessing mode drops ----------------------------------------------------------------------

CRAFTED = "Éé café, Noël!\n123 ok"      # 17 non-whitespace characters


def test_report_counts_what_d2l_removes_and_lower_cases():
    report = owntext.preprocessing_report(CRAFTED, "d2l")
    assert report["characters"] == 21 and report["non_whitespace"] == 17
    assert (report["removed"], report["changed"], report["letters_removed"]) == (9, 1, 4)
    assert report["removed_share"] == pytest.approx(9 / 17) and report["changed_share"] == pytest.approx(1 / 17)
    assert report["affected_share"] == pytest.approx(10 / 17)
    assert report["top_removed"] == [("é", 2), ("!", 1), (",", 1), ("1", 1), ("2", 1), ("3", 1), ("É", 1),
                                     ("ë", 1)]
    assert report["top_letters_removed"] == [("é", 2), ("É", 1), ("ë", 1)]
    assert report["top_changed"] == [("N", 1)]
    assert report == owntext.preprocessing_report(CRAFTED, "letters") | {"mode": "d2l"}


def test_report_of_the_other_modes():
    legacy = owntext.preprocessing_report(CRAFTED, "legacy")
    assert (legacy["removed"], legacy["changed"], legacy["top_changed"]) == (0, 2, [("N", 1), ("É", 1)])
    raw = owntext.preprocessing_report(CRAFTED, "raw")
    assert (raw["removed"], raw["changed"], raw["affected_share"]) == (0, 0, 0.0)
    uni = owntext.preprocessing_report("a\u200bb\u2126 \u200b", "unicode")
    assert uni["non_whitespace"] == 5 and uni["top_removed"] == [("\u200b", 2)]
    assert uni["top_changed"] == [("\u2126", 1)] and uni["letters_removed"] == 0
    assert owntext.preprocessing_report(" \n\n", "d2l")["affected_share"] == 0.0


def test_report_line_names_letters_first_and_says_how_to_keep_them():
    line = owntext.report_line(owntext.preprocessing_report(CRAFTED, "d2l"))
    assert line == ("d2l preprocessing removes or replaces 52.9% of the text's non-space characters "
                    "(é ×2, É ×1, ë ×1, '!' ×1, ',' ×1, ...) and lower-cases 5.9% (N ×1); "
                    "--preprocess unicode keeps them")
    line = owntext.report_line(owntext.preprocessing_report("a\u200b" * 10, "unicode"))
    assert line == "unicode preprocessing removes or replaces 50.0% of the text's non-space characters ('\\u200b' ×10)"
    line = owntext.report_line(owntext.preprocessing_report("b" * 90 + "A" * 10, "legacy"))
    assert line == ("legacy preprocessing lower-cases 10.0% of the text's non-space characters (A ×10); "
                    "--preprocess unicode keeps them")


@pytest.mark.parametrize("raw, mode, shown", [
    ("a" * 98 + "A,", "d2l", False),            # 2% affected: not above the threshold
    ("a" * 97 + "AA,", "d2l", True),            # 3%
    ("a" * 999 + "é", "d2l", False),            # one letter in a thousand removed
    ("a" * 998 + "éé", "d2l", True),            # two
    ("a" * 998 + "éé", "legacy", False),        # legacy keeps é
    (CRAFTED, "raw", False),
    ("\n\n", "d2l", False),
])
def test_report_line_thresholds(raw, mode, shown):
    assert (owntext.report_line(owntext.preprocessing_report(raw, mode)) is not None) == shown


def test_report_refuses_an_unknown_mode():
    with pytest.raises(RnnlabError, match="unknown preprocess mode 'ascii'"):
        owntext.preprocessing_report("abc", "ascii")


# --- prompts from the text --------------------------------------------------------------------------------

LINES = "".join(f"Start{i} of line {i}\n" for i in range(10))      # 17 characters a line


def test_prompts_begin_lines_about_a_quarter_and_over_half_way_in():
    assert owntext.prompts(LINES) == ("Start3 of line ", "Start6 of line ")
    assert owntext.prompts(LINES, count=3) == ("Start3 of line ", "Start5 of line ", "Start7 of line ")
    assert owntext.prompts(LINES, seed=1) != owntext.prompts(LINES)
    assert owntext.prompts(LINES, seed=1) == owntext.prompts(LINES, seed=1)


def test_prompts_prefer_a_sentence_start_and_stop_at_a_word_boundary():
    raw = "x " * 40 + "\nbroken mid sentence\nover lines. Supercalifragilistic expialidocious word\n"
    assert owntext.prompts(raw, count=1) == ("Supercalifragilistic ",)
    for prompt in owntext.prompts(raw * 5, count=4):
        assert prompt in raw and len(prompt) <= owntext.PROMPT_CHARS


def test_prompts_of_a_text_without_line_breaks_start_at_words_spread_through_it():
    d2l = ("the time machine by h g wells i the time traveller for so it will be convenient to speak of him was "
           "expounding a recondite matter to us")                          # 135 characters: places 33 and 74
    assert owntext.prompts(d2l) == ("time traveller for ", "to speak of ")


@pytest.mark.parametrize("raw, expected", [
    ("Hi there!", ("there!", "Hi there!")),               # very short: words after a quarter and over half
    ("Hi!", ("Hi!",)),                                    # way in, else the start; never a duplicate
    ("a short text of 20ch", ("text of 20ch", "of 20ch")),
    ("x" * 100, ("x" * 12,)),                             # no spaces
    ("这是第一句。这是第二句。" * 3, ("这是第一句。这是第二句。", "这是第二句。")),
    ("%\n%\n", ("%",)),                                   # no letters
    ("\n\n\n", ()),
    (" \t\n ", ()),
])
def test_prompts_of_awkward_texts(raw, expected):
    assert owntext.prompts(raw) == expected


def test_prompts_count_must_be_positive():
    with pytest.raises(RnnlabError, match="positive integer, got 0"):
        owntext.prompts("some text", count=0)


# --- which settings a run uses ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{}, {"corpus": "timemachine"}])
def test_no_corpus_or_the_books_is_the_books_run(data):
    got = presets.resolve(None, dict(data), {}, {})
    assert got == (data, {}, {}, None)
    configs = DataConfig(**got[0]), ModelConfig(**got[1]), TrainConfig(**got[2])
    assert configs == (DataConfig(), ModelConfig(), TrainConfig())
    assert configs[2].prefixes == ("time traveller", "traveller") and configs[0].preprocess == "d2l"


def test_another_corpus_gets_the_text_preset_and_a_note():
    given = {"corpus": "roman.txt"}
    data, model, train, note = presets.resolve(None, given, {}, {})
    assert given == {"corpus": "roman.txt"}                       # the caller's dict is left alone
    assert data == {"corpus": "roman.txt", "preprocess": "unicode", "max_tokens": 0}
    assert model == presets.PRESETS["text"]["model"] and train["prefixes"] == ()
    assert note.startswith("using the defaults for your own text (--preset text; flags given override them): "
                           "unicode preprocessing, all of the text, a 1-layer GRU (H=384), adam lr 0.004 ")
    assert note.endswith("; --preset book for the book's") and "\n" not in note
    assert presets.resolve(None, {"corpus": "war_of_the_worlds"}, {}, {})[0]["preprocess"] == "unicode"
    configs = DataConfig(**data), ModelConfig(**model), TrainConfig(**train)
    validate_sizes(*configs)


def test_flags_given_override_the_text_preset():
    data, model, train, _ = presets.resolve(None, {"corpus": "x.txt", "preprocess": "d2l"}, {"cell": "gru"},
                                            {"prefixes": ("Ab",), "num_epochs": 3})
    assert data["preprocess"] == "d2l" and data["max_tokens"] == 0 and model["cell"] == "gru"
    assert train["prefixes"] == ("Ab",) and train["num_epochs"] == 3 and train["optimizer"] == "adam"


def test_a_presets_prompts_are_dropped_for_another_corpus():
    assert presets.resolve("shakespeare", {}, {}, {})[2]["prefixes"] == ("ROMEO:",)
    data, model, train, note = presets.resolve("shakespeare", {"corpus": "roman.txt"}, {}, {})
    assert data["corpus"] == "roman.txt" and train["prefixes"] == () and note is None
    assert data["preprocess"] == "raw" and model["cell"] == "lstm"                # the rest of the preset stays
    kept = presets.resolve("shakespeare", {"corpus": "roman.txt"}, {}, {"prefixes": ("JULIET:",)})
    assert kept[2]["prefixes"] == ("JULIET:",)
    book = presets.resolve("book", {"corpus": "war_of_the_worlds"}, {}, {})
    assert book == ({"corpus": "war_of_the_worlds"}, {}, {"prefixes": ()}, None)
    assert presets.resolve("book", {}, {}, {}) == ({}, {}, {}, None)
    assert presets.resolve("legacy", {}, {}, {})[2]["prefixes"] == ("traveller", "time traveller")


def test_resolve_refuses_an_unknown_preset():
    with pytest.raises(RnnlabError, match="unknown preset 'novel'"):
        presets.resolve("novel", {"corpus": "x.txt"}, {}, {})


@pytest.mark.usefixtures("needs_corpora")
@pytest.mark.parametrize("name", [n for n, p in presets.PRESETS.items() if "corpus" in p["data"]])
def test_every_corpus_preset_builds_a_valid_run_on_its_own_corpus_and_can_write_its_prompts(name):
    """A preset made for a corpus names one that exists, its settings pass the config checks, and every
    prompt it samples from is spelled by that corpus's vocabulary (no `<unk>` in a preset's own samples)."""
    data, model, train, note = presets.resolve(name, {}, {}, {})
    assert note is None and train["prefixes"] == presets.PRESETS[name]["train"].get("prefixes", ())
    validate_sizes(DataConfig(**data), ModelConfig(**model), TrainConfig(**train))
    raw = corpora.read_text(corpora.locate(data["corpus"]))
    tokens = text.preprocess(raw, data["preprocess"], "char")
    for prompt in train["prefixes"]:
        normalised = text.preprocess(prompt, data["preprocess"], "char")
        assert normalised and set(normalised) <= set(tokens), (name, prompt)


def test_a_presets_torch_path_gives_way_to_another_backend(monkeypatch):
    pytest.importorskip("torch")
    assert presets.resolve("timemachine", {}, {}, {})[2]["matmul_dtype"] == "bfloat16"
    with monkeypatch.context() as m:                  # auto on a machine without torch: numpy
        m.setattr(backends, "torch_available", lambda: False)
        assert "matmul_dtype" not in presets.resolve("shakespeare", {}, {}, {})[2]
    for backend in ("numpy", "jax"):
        train = presets.resolve("timemachine", {}, {}, {"backend": backend})[2]
        assert "matmul_dtype" not in train and "torch_impl" not in train
        assert train["num_epochs"] == presets.PRESETS["timemachine"]["train"]["num_epochs"]     # the rest stays
    named = presets.resolve("timemachine", {}, {}, {"backend": "numpy", "matmul_dtype": "bfloat16"})[2]
    assert named["matmul_dtype"] == "bfloat16"                # given: kept, and refused by the backend
