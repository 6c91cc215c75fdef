"""The character pipeline for ASCII text, vectorised: preprocessing, counting and encoding on byte arrays.

For ASCII text (most corpora, including the book's) this gives exactly what `text.load_corpus` gives through
Python strings and a Counter, in a few numpy passes over chunks. Memory stays near one byte per character: the
preprocessed bytes are written into one uint8 array and then turned into token indices in place; temporary
arrays are per chunk.

Character classes: LETTER (A-Z, a-z), OTHER (every other byte: becomes ' ' in d2l/letters), NEWLINE (d2l only:
a line break, where d2l strips the lines on either side and joins them with no separator). In unicode mode an
ASCII text keeps every byte but the control characters: vertical tab and form feed become '\n', the others
(all but '\t' and '\n') are removed; NFC leaves ASCII unchanged.
"""
from __future__ import annotations

import re

import numpy as np

LETTER, OTHER, NEWLINE = 0, 1, 2
CHUNK = 1 << 20                                     # characters per chunk: bounds the temporaries
_LETTER_PAIR = re.compile("[A-Za-z](?=[A-Za-z])")

_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[ord("A"): ord("Z") + 1] += 32
_CLASS = np.full(256, OTHER, dtype=np.uint8)
_CLASS[ord("A"): ord("Z") + 1] = LETTER
_CLASS[ord("a"): ord("z") + 1] = LETTER
_LETTERS_ONLY = np.where(_CLASS == LETTER, _LOWER, ord(" ")).astype(np.uint8)
_UNICODE_MAP = np.arange(256, dtype=np.uint8)
_UNICODE_MAP[[0x0B, 0x0C]] = ord("\n")                # vertical tab, form feed: line breaks
_UNICODE_KEEP = np.ones(256, dtype=bool)
_UNICODE_KEEP[[*range(0x20), 0x7F]] = False            # the control characters (Unicode Cc) ...
_UNICODE_KEEP[[0x09, 0x0A, 0x0B, 0x0C]] = True         # ... but tab, newline and the line breaks


def _chunks(text: str, mode: str):
    """Pieces of `text` that can be preprocessed independently (d2l: cut just after a line break)."""
    start = 0
    while start < len(text):
        stop = min(start + CHUNK, len(text))
        if mode == "d2l" and stop < len(text):
            cut = text.rfind("\n", start, stop)
            stop = cut + 1 if cut >= start else _between_letters(text, stop)
        yield text[start:stop]
        start = stop


def _between_letters(text: str, stop: int) -> int:
    """A cut point at or after `stop` in a line longer than a chunk, where no run of non-letters is split:
    between two letters (or the end of the text)."""
    match = _LETTER_PAIR.search(text, max(stop - 1, 0))
    return match.start() + 1 if match else len(text)


def _keep_d2l(cls: np.ndarray) -> np.ndarray:
    """Which bytes of a line-aligned chunk survive d2l: letters, and one space for each run of other bytes
    that has a letter on both sides within the same line (runs at a line's ends are stripped)."""
    keep = cls == LETTER
    prev = np.concatenate(([NEWLINE], cls[:-1]))
    is_other = cls == OTHER
    starts = np.flatnonzero(is_other & (prev != OTHER))         # first byte of each run of OTHER
    ends = np.flatnonzero(~is_other & (prev == OTHER))          # first byte after each run
    starts = starts[: len(ends)]                                # a run reaching the chunk's end: stripped
    both_letters = (prev[starts] == LETTER) & (cls[ends] == LETTER)
    keep[starts[both_letters]] = True
    return keep


def _keep_letters(cls: np.ndarray, prev_is_letter: bool) -> np.ndarray:
    """letters mode: letters, and the first byte of each run of other bytes (it becomes one space)."""
    prev = np.concatenate(([LETTER if prev_is_letter else OTHER], cls[:-1]))
    return (cls == LETTER) | (prev == LETTER)


def preprocess_bytes(text: str, mode: str) -> np.ndarray:
    """The preprocessed text as a uint8 array of ASCII codes (`text.preprocess` for char tokens)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
    out = np.empty(len(text), dtype=np.uint8)
    n, prev_is_letter = 0, True
    for piece in _chunks(text, mode):
        b = np.frombuffer(piece.encode("ascii"), dtype=np.uint8)
        if mode == "raw":
            kept = b
        elif mode == "unicode":
            kept = _UNICODE_MAP[b[_UNICODE_KEEP[b]]]
        elif mode == "d2l":
            cls = _CLASS[b]
            cls[b == ord("\n")] = NEWLINE
            kept = _LETTERS_ONLY[b[_keep_d2l(cls)]]
        else:
            cls = _CLASS[b]
            kept = _LETTERS_ONLY[b[_keep_letters(cls, prev_is_letter)]]
            prev_is_letter = bool(cls[-1] == LETTER)
        out[n: n + len(kept)] = kept
        n += len(kept)
    return out[:n]


def counts_in_first_seen_order(codes: np.ndarray) -> list[tuple[str, int]]:
    """[(char, count)] in order of first occurrence: what a Counter over the string holds."""
    counts = np.zeros(256, dtype=np.int64)
    first = np.full(256, np.iinfo(np.int64).max, dtype=np.int64)
    for start in range(0, len(codes), CHUNK):
        piece = codes[start: start + CHUNK]
        piece_counts = np.bincount(piece, minlength=256)
        for c in np.flatnonzero((piece_counts > 0) & (counts == 0)):    # characters new in this chunk
            first[c] = start + int(np.argmax(piece == c))
        counts += piece_counts
    seen = np.flatnonzero(counts)
    return [(chr(c), int(counts[c])) for c in seen[np.argsort(first[seen], kind="stable")]]


def encode_in_place(codes: np.ndarray, token_to_idx: dict, unk: int) -> np.ndarray:
    """ASCII codes -> token indices, overwriting `codes` chunk by chunk (every index < 256 here)."""
    lut = np.full(256, unk, dtype=np.uint8)
    for tok, idx in token_to_idx.items():
        if len(tok) == 1 and ord(tok) < 256:
            lut[ord(tok)] = idx
    for start in range(0, len(codes), CHUNK):
        codes[start: start + CHUNK] = lut[codes[start: start + CHUNK]]
    return codes
