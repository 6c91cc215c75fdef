"""Text pipeline: the book's corpus sizes, Vocab semantics, and vectorised encoding."""
import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnlab import text
from rnnlab.errors import RnnlabError


def test_book_corpus_sizes(timemachine_text):
    corpus, vocab = text.load_corpus(timemachine_text, "d2l", "char")
    assert len(corpus) == 170_580 and len(vocab) == 28
    assert vocab.idx_to_token[:5] == ["<unk>", " ", "e", "t", "a"]   # the book's printed order
    letters, vocab_l = text.load_corpus(timemachine_text, "letters", "char")
    assert len(letters) == 173_428 and len(vocab_l) == 28
    words, vocab_w = text.load_corpus(timemachine_text, "d2l", "word")
    assert len(vocab_w) == 4_580                                       # word types and <unk>
    assert corpus.dtype == np.uint8 and vocab_w and words.dtype == np.uint16


def test_d2l_mode_matches_per_line_definition():
    raw = "The Time-Machine!\n  by H. G. Wells \r\n\nEnd."
    lines = ["the time machine", "by h g wells", "", "end"]
    assert text.preprocess(raw, "d2l") == "".join(lines)
    assert text.preprocess(raw, "d2l", "word").split() == " ".join(lines).split()
    assert text.preprocess(raw, "letters") == "the time machine by h g wells end "
    assert text.preprocess("a\r\nb", "raw") == "a\nb"


def test_vocab_book_semantics():
    tokens = [list("abcbca"), list("dd")]       # counts: a2 b2 c2 d2 -> ties keep first occurrence
    vocab = text.Vocab(tokens, reserved_tokens=["<pad>"])
    assert vocab.idx_to_token == ["<unk>", "<pad>", "a", "b", "c", "d"]
    assert vocab["b"] == 3 and vocab["zz"] == vocab.unk == 0
    assert vocab[["a", "d", "?"]] == [2, 5, 0]
    assert vocab.to_tokens([2, 5]) == ["a", "d"] and vocab.to_tokens(4) == "c"
    assert vocab.token_freqs[0] == ("a", 2)
    rare = text.Vocab(list("aaab"), min_freq=2)
    assert rare.idx_to_token == ["<unk>", "a"] and rare["b"] == 0


def test_vocab_order_is_descending_frequency_stable():
    s = "xyyzzzww"
    vocab = text.Vocab(s)
    assert vocab.idx_to_token == ["<unk>", "z", "y", "w", "x"]


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_encode_equals_lookup_loop(s):
    vocab = text.Vocab(s[: len(s) // 2 + 1])     # some characters of s are unknown
    encoded = text.encode(s, vocab)
    assert encoded.tolist() == [vocab[c] for c in s]
    assert text.decode(encoded[encoded != 0], vocab) == "".join(c for c in s if vocab[c] != 0)


def test_encode_chunks_and_dtypes(monkeypatch):
    monkeypatch.setattr(text, "_CHUNK", 7)      # force several chunks
    s = "héllo wörld ∑ " * 5
    vocab = text.Vocab(s)
    assert text.encode(s, vocab).tolist() == vocab[list(s)]
    assert text.index_dtype(256) == np.uint8 and text.index_dtype(257) == np.uint16
    assert text.index_dtype(70_000) == np.int32


def test_word_tokens_and_empty_corpus():
    corpus, vocab = text.load_corpus("the cat the dog", "raw", "word")
    assert vocab.to_tokens(list(corpus)) == ["the", "cat", "the", "dog"]
    assert collections.Counter(corpus.tolist())[vocab["the"]] == 2
    with pytest.raises(RnnlabError, match="no tokens"):
        text.load_corpus("1234 !!", "d2l", "word")


def test_tokenize_lines_like_the_book():
    assert text.tokenize(["ab c", "d"], "char") == [["a", "b", " ", "c"], ["d"]]
    assert text.tokenize(["ab c", "d"], "word") == [["ab", "c"], ["d"]]
    assert text.Vocab(text.tokenize(["ab", "b"], "char")).idx_to_token == ["<unk>", "b", "a"]


def test_normalize_prefix_keeps_trailing_space():
    assert text.normalize_prefix("Time Traveller, ", "d2l") == "time traveller "
    assert text.normalize_prefix("Time!", "raw") == "Time!"


ascii_text = st.lists(st.sampled_from(list("abcXYZ  ,.!\n\r\t-'") + ["\r\n"]), max_size=300).map("".join)


def slow_path(s, mode):
    """The string pipeline the vectorised ASCII path must reproduce."""
    tokens = text.tokenize(text.preprocess(s, mode), "char")
    vocab = text.Vocab(tokens)
    return text.encode(tokens, vocab), vocab


@settings(max_examples=150, deadline=None)
@given(ascii_text, st.sampled_from(text.PREPROCESS_MODES), st.sampled_from([3, 7, 1 << 22]))
def test_ascii_fast_path_equals_the_string_pipeline(s, mode, chunk):
    from rnnlab import ascii_chars
    original = ascii_chars.CHUNK
    ascii_chars.CHUNK = chunk                      # small chunks: cuts inside lines and inside runs
    try:
        expected, vocab = slow_path(s, mode)
        if len(expected) == 0:
            with pytest.raises(RnnlabError):
                text.load_corpus(s, mode)
            return
        got, got_vocab = text.load_corpus(s, mode)
    finally:
        ascii_chars.CHUNK = original
    assert got_vocab.idx_to_token == vocab.idx_to_token
    assert got_vocab.token_freqs == vocab.token_freqs
    assert got.tolist() == expected.tolist() and got.dtype == np.uint8


def test_ascii_fast_path_with_a_given_vocab_maps_unknowns():
    vocab = text.Vocab("ab ")
    corpus, same = text.load_corpus("abc ba", "raw", vocab=vocab)
    assert same is vocab and corpus.tolist() == vocab[list("abc ba")]
