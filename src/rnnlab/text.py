"""Text pipeline: preprocessing, tokenization, the book's `Vocab`, and vectorised encoding.

Preprocessing modes:
  d2l      the book's `read_time_machine`: each line [^A-Za-z]+ -> ' ', stripped, lower-cased; for characters the
           lines are concatenated with no separator (170,580 tokens for The Time Machine, as the book's corpus)
  letters  the same substitution over the whole text, so words on either side of a line break stay apart
  raw      every character kept (only line endings normalised to '\n')
  unicode  for a user's own text: every letter (accents included), digit, punctuation mark and case kept,
           NFC-normalised (a decomposed and a composed é are one token); line endings and the other line
           breaks (vertical tab, form feed, U+0085, U+2028, U+2029) become '\n'; control and format
           characters (Unicode Cc and Cf: zero-width spaces, soft hyphens, a BOM) are removed, except '\n'
           and '\t'
  legacy   the early notebook's (d2l-en, 2019): lower-cased, every run of whitespace (line breaks included)
           collapsed to one space, the ends stripped; punctuation and digits kept. Its vocabulary
           (`legacy_vocab`) counts only the training text and breaks ties in code-point order.
"""
from __future__ import annotations

import collections
import re
import unicodedata

import numpy as np

from . import ascii_chars
from .errors import RnnlabError

PREPROCESS_MODES = ("d2l", "letters", "raw", "legacy", "unicode")
TOKEN_TYPES = ("char", "word")
_NON_LETTERS = re.compile("[^A-Za-z]+")
LINE_BREAKS = "\x0b\x0c\x85\u2028\u2029"     # become '\n' in unicode mode ('\r' and '\r\n' too)


def _lines(text: str) -> list[str]:
    """Lines as Python's text-mode `readlines` splits them (universal newlines)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def preprocess(text: str, mode: str, token: str = "char") -> str:
    """Apply a preprocessing mode; the result is what gets tokenized (chars, or words split on whitespace)."""
    if mode == "d2l":
        lines = [_NON_LETTERS.sub(" ", line).strip().lower() for line in _lines(text)]
        # The book flattens per-line char lists with no separator; words are split per line.
        return ("" if token == "char" else " ").join(lines)
    if mode == "letters":
        return _NON_LETTERS.sub(" ", text).lower()
    if mode == "raw":
        return text.replace("\r\n", "\n").replace("\r", "\n")
    if mode == "legacy":
        return " ".join(text.lower().split())
    if mode == "unicode":
        return unicode_text(text)
    raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")


def normalize_prefix(prefix: str, mode: str) -> str:
    """Map a user's prompt into the model's alphabet (no stripping: a trailing space is meaningful)."""
    if mode in ("d2l", "letters"):
        return _NON_LETTERS.sub(" ", prefix).lower()
    if mode == "legacy":
        return re.sub(r"\s+", " ", prefix.lower())
    if mode == "unicode":
        return unicode_text(prefix)
    return prefix


def _removed_in_unicode(char: str) -> bool:
    """Whether unicode mode drops a character: a control (Cc) or format (Cf) character other than '\n', '\t'
    and the line breaks that become '\n'."""
    return unicodedata.category(char) in ("Cc", "Cf") and char not in "\n\t\r" + LINE_BREAKS


def _class_of(chars) -> re.Pattern:
    return re.compile("[" + "".join(re.escape(c) for c in sorted(chars)) + "]")


def unicode_text(text: str) -> str:
    """The unicode preprocessing mode (see the module docstring).

    What to drop is decided once per distinct character of the text, so a multi-MB text costs a few passes
    in C: a set, a regex substitution only where such characters occur, and NFC normalisation. Characters
    are removed before normalising, so a soft hyphen between a letter and its combining accent does not
    keep them apart.
    """
    distinct = set(text)
    removed = {c for c in distinct if _removed_in_unicode(c)}
    if removed:
        text = _class_of(removed).sub("", text)
    text = text.replace("\r\n", "\n")
    breaks = distinct.intersection("\r" + LINE_BREAKS)
    if breaks:
        text = _class_of(breaks).sub("\n", text)
    return unicodedata.normalize("NFC", text)


def tokenize(text, token: str = "char"):
    """Characters (the string itself, a sequence of chars) or whitespace-separated words.

    Given a list of lines, as the book's `tokenize(lines, token)`, returns one token list per line.
    """
    if isinstance(text, list):
        return [list(tokenize(line, token)) for line in text]
    if token == "char":
        return text
    if token == "word":
        return text.split()
    raise ValueError(f"unknown token type {token!r}; choose from {TOKEN_TYPES}")


def count_corpus(tokens) -> collections.Counter:
    """Token frequencies of a flat or nested (list of lines) token sequence, as the book's `count_corpus`."""
    if len(tokens) and isinstance(tokens[0], list):
        tokens = [tok for line in tokens for tok in line]
    return collections.Counter(tokens)


class Vocab:
    """The book's vocabulary: `<unk>` at index 0, then reserved tokens, then tokens by descending frequency.

    Ties keep first-occurrence order (a stable sort of a Counter, exactly as the book). Tokens rarer than
    `min_freq` are left out and map to `<unk>`.
    """

    def __init__(self, tokens=None, min_freq: int = 0, reserved_tokens=None):
        counter = count_corpus(tokens if tokens is not None else [])
        self._build(counter.items(), min_freq, reserved_tokens)

    @classmethod
    def from_counts(cls, counts, min_freq: int = 0, reserved_tokens=None) -> "Vocab":
        """The vocabulary of a corpus given as (token, count) pairs in first-occurrence order."""
        vocab = cls.__new__(cls)
        vocab._build(counts, min_freq, reserved_tokens)
        return vocab

    def _build(self, counts, min_freq, reserved_tokens) -> None:
        self._token_freqs = sorted(counts, key=lambda x: x[1], reverse=True)
        self.idx_to_token = ["<unk>"] + list(reserved_tokens or [])
        self.token_to_idx = {tok: idx for idx, tok in enumerate(self.idx_to_token)}
        for tok, freq in self._token_freqs:
            if freq < min_freq:
                break
            if tok not in self.token_to_idx:
                self.idx_to_token.append(tok)
                self.token_to_idx[tok] = len(self.idx_to_token) - 1

    @classmethod
    def from_tokens_list(cls, idx_to_token: list[str], token_freqs=()) -> "Vocab":
        """Rebuild a vocabulary saved as its index->token list (from a checkpoint)."""
        if not idx_to_token or idx_to_token[0] != "<unk>" or len(set(idx_to_token)) != len(idx_to_token):
            raise RnnlabError("vocabulary must start with '<unk>' and hold distinct tokens")
        vocab = cls()
        vocab.idx_to_token = list(idx_to_token)
        vocab.token_to_idx = {tok: idx for idx, tok in enumerate(vocab.idx_to_token)}
        vocab._token_freqs = [(tok, int(freq)) for tok, freq in token_freqs]
        return vocab

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        return [self.__getitem__(tok) for tok in tokens]

    def to_tokens(self, indices):
        if not isinstance(indices, (list, tuple, np.ndarray)):
            return self.idx_to_token[int(indices)]
        return [self.idx_to_token[int(i)] for i in indices]

    @property
    def unk(self) -> int:
        return 0

    @property
    def token_freqs(self) -> list[tuple[str, int]]:
        return self._token_freqs


def legacy_vocab(tokens) -> Vocab:
    """The early notebook's vocabulary: `<unk>` at 0, then tokens by descending count, ties in code-point
    order (it sorted by token, then stably by count), over the tokens given (its training text only)."""
    return Vocab.from_counts(sorted(collections.Counter(tokens).items()))


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token index."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


_CHUNK = 1 << 22  # characters encoded at a time: bounds the temporary int32 code-point buffer


def encode(tokens, vocab: Vocab) -> np.ndarray:
    """Token indices as a compact 1-D array; unknown tokens become `<unk>`.

    Characters are encoded without a per-character Python loop: code points through a lookup table.
    """
    dtype = index_dtype(len(vocab))
    if not isinstance(tokens, str):
        get = vocab.token_to_idx.get
        return np.fromiter((get(t, vocab.unk) for t in tokens), dtype=dtype, count=len(tokens))
    lut = np.full(0x110000, vocab.unk, dtype=dtype)  # every Unicode code point -> index
    for tok, idx in vocab.token_to_idx.items():
        if len(tok) == 1:
            lut[ord(tok)] = idx
    out = np.empty(len(tokens), dtype=dtype)
    for start in range(0, len(tokens), _CHUNK):
        piece = tokens[start:start + _CHUNK]
        codes = np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        out[start:start + len(piece)] = lut[codes]
    return out


def decode(indices, vocab: Vocab, token: str = "char") -> str:
    """Indices back to text: characters joined directly, words with spaces."""
    return ("" if token == "char" else " ").join(vocab.to_tokens(list(np.asarray(indices).reshape(-1))))


def load_corpus(text: str, preprocess_mode: str = "d2l", token: str = "char", min_freq: int = 0,
                vocab: Vocab | None = None):
    """(corpus, vocab): the whole text encoded, with `vocab` or one built over the whole text (the book's)."""
    if token == "char" and preprocess_mode != "legacy" and text.isascii() and (vocab is None or len(vocab) <= 256):
        codes = ascii_chars.preprocess_bytes(text, preprocess_mode)      # the fast path, same result
        if len(codes) == 0:
            raise RnnlabError(f"no tokens left after '{preprocess_mode}' preprocessing")
        vocab = vocab or Vocab.from_counts(ascii_chars.counts_in_first_seen_order(codes), min_freq)
        return ascii_chars.encode_in_place(codes, vocab.token_to_idx, vocab.unk), vocab
    tokens = tokenize(preprocess(text, preprocess_mode, token), token)
    if len(tokens) == 0:
        raise RnnlabError(f"no tokens left after '{preprocess_mode}' preprocessing")
    vocab = vocab or Vocab(tokens, min_freq=min_freq)
    return encode(tokens, vocab), vocab
