"""The character pipeline for ASCII text, vectorised: preprocessing, counting and encoding on bytes and byte arrays.

For ASCII text (most corpora, including the book's) this gives exactly what `text.load_corpus` gives through
Python strings and a Counter, in a few passes over chunks with `bytes.translate` and numpy. Memory stays near
one byte per character: the preprocessed bytes are written into one uint8 array and then turned into token
indices in place; temporary arrays are per chunk.

`preprocess_piece` is the unit both this module and prepare.py (which streams a file of any size) use: one
piece of the text, cut just after a line break or between two letters (`cut`), so no line (d2l), run of
non-letters (letters) or '\r\n' (raw, unicode) is split; letters mode carries whether the previous piece
ended in a letter. d2l and letters read bytes only: every byte of a multi-byte UTF-8 character is >= 0x80, so
a non-letter, and becomes part of a run of non-letters, as the character does in `text.preprocess`. raw and
unicode need ASCII pieces. In unicode mode an ASCII text keeps every byte but the control characters: those
other than tab and the line breaks are removed first, then '\r\n', '\r', vertical tab and form feed become
'\n' (the order of `text.unicode_text`); NFC leaves ASCII unchanged.
"""
from __future__ import annotations

import numpy as np

CHUNK = 1 << 20                                     # characters per chunk: bounds the temporaries
SPACE, NEWLINE = ord(" "), ord("\n")


def _table(mapping) -> bytes:
    """A 256-byte `bytes.translate` table: byte -> mapping(byte)."""
    return bytes(mapping(b) for b in range(256))


def _is_letter(b: int) -> bool:
    return ord("A") <= b <= ord("Z") or ord("a") <= b <= ord("z")


_LETTERS_ONLY = _table(lambda b: b | 0x20 if _is_letter(b) else SPACE)          # lower-case letters, else ' '
_D2L = _table(lambda b: NEWLINE if b in b"\r\n" else _LETTERS_ONLY[b])          # ... and the line breaks
_LETTER_MASK = _table(lambda b: 1 if _is_letter(b) else 0)
_CONTROLS = bytes(b for b in [*range(0x20), 0x7F] if b not in b"\t\n\r\x0b\x0c")   # what unicode mode removes
_BREAKS = _table(lambda b: NEWLINE if b in b"\r\x0b\x0c" else b)
_CR = _table(lambda b: NEWLINE if b == ord("\r") else b)


def cut(data, start: int, stop: int) -> int:
    """Where to end a piece of data[start:stop] (bytes, or an ASCII str) that `preprocess_piece` reads on its
    own: just after its last line break, else between its last two adjacent ASCII letters; 0 when it has
    neither."""
    newline = data.rfind("\n" if isinstance(data, str) else b"\n", start, stop)
    if newline >= 0:
        return newline + 1
    piece = data[start:stop]
    if isinstance(piece, str):
        piece = piece.encode("ascii")
    letters = np.frombuffer(piece.translate(_LETTER_MASK), dtype=np.bool_)
    pairs = np.flatnonzero(letters[:-1] & letters[1:])
    return start + int(pairs[-1]) + 1 if len(pairs) else 0


def _pieces(text: str):
    """Pieces of `text` (ASCII) of about CHUNK characters, cut where `cut` says (a piece grows past CHUNK
    only in a line that has no two adjacent letters within it)."""
    start = 0
    while start < len(text):
        stop = start + CHUNK
        while stop < len(text) and not (end := cut(text, start, stop)):
            stop += CHUNK
        stop = end if stop < len(text) else len(text)
        yield text[start:stop].encode("ascii")
        start = stop


def _d2l(piece: bytes) -> bytes:
    """d2l on a piece: each line's words (runs of letters, lower-cased) joined by one space, the lines joined
    with no separator. A space is kept at the end of a word when the gap to the next word holds no line break."""
    x = np.frombuffer(piece.translate(_D2L), dtype=np.uint8)        # letters, ' ' and '\n'
    letter = x > SPACE
    edges = np.flatnonzero(letter[1:] != letter[:-1]) + 1
    if len(x) and letter[0]:
        edges = np.concatenate(([0], edges))
    starts, ends = edges[letter[edges]], edges[~letter[edges]]       # words are x[starts[k]:ends[k]]
    gaps = np.ones(max(len(starts) - 1, 0), dtype=bool)             # gap k: between word k and word k + 1
    in_gap = np.searchsorted(starts, np.flatnonzero(x == NEWLINE)) - 1
    gaps[in_gap[(in_gap >= 0) & (in_gap < len(gaps))]] = False
    keep = letter.copy()
    keep[ends[: len(gaps)][gaps]] = True
    return x[keep].tobytes()


def _letters(piece: bytes, after_letter: bool) -> tuple[bytes, bool]:
    """letters on a piece: lower-cased letters, and the first byte of each run of other bytes as one space
    (not when the run began in the previous piece, which did not end in a letter)."""
    x = np.frombuffer(piece.translate(_LETTERS_ONLY), dtype=np.uint8)
    if not len(x):
        return b"", after_letter
    letter = x != SPACE
    keep = letter.copy()
    keep[1:] |= letter[:-1]
    keep[0] |= after_letter
    return x[keep].tobytes(), bool(letter[-1])


def preprocess_piece(piece: bytes, mode: str, after_letter: bool = True) -> tuple[bytes, bool]:
    """(the piece preprocessed, whether it ended in a letter): `text.preprocess(piece, mode)` for char tokens
    on a piece cut where `cut` says; `after_letter` is what the previous piece returned (True at the start)."""
    if mode == "d2l":
        return _d2l(piece), after_letter
    if mode == "letters":
        return _letters(piece, after_letter)
    if mode == "unicode":
        piece = piece.translate(None, _CONTROLS)
        return (piece.replace(b"\r\n", b"\n") if b"\r" in piece else piece).translate(_BREAKS), after_letter
    if mode == "raw":
        return (piece.replace(b"\r\n", b"\n").translate(_CR) if b"\r" in piece else piece), after_letter
    raise ValueError(f"no vectorised preprocessing for mode {mode!r}")


def preprocess_bytes(text: str, mode: str) -> np.ndarray:
    """The preprocessed text as a uint8 array of ASCII codes (`text.preprocess` for char tokens)."""
    out = np.empty(len(text), dtype=np.uint8)
    n, after_letter = 0, True
    for piece in _pieces(text):
        kept, after_letter = preprocess_piece(piece, mode, after_letter)
        out[n: n + len(kept)] = np.frombuffer(kept, dtype=np.uint8)
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
