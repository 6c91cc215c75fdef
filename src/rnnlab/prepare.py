"""`rnnlab prepare TEXT --out DIR`: encode a text once, in two streaming passes whose memory is bounded by the
chunk size, into the prepared directory that `prepared.load` reads (its format and checks are described
there). Pass 1 preprocesses and counts each chunk and writes the preprocessed text to a temporary file; the
vocabulary is the book's `Vocab` over those counts; pass 2 encodes the preprocessed text into the token file.
"""
from __future__ import annotations

import codecs
import collections
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from filelock import FileLock, Timeout

from . import ascii_chars, corpora, text
from .errors import RnnlabError
from .fileio import atomic_write_json, sha256_file

from .prepared import FORMAT, LOCK_FILE, META_FILE, MODES, TEMP_NAME, TOKENS_NAME, VERSION, _checksum

CHUNK = 8 << 20                   # bytes read at a time: what bounds the memory of both passes
Progress = Callable[[str, int, int], None]      # (pass, bytes done, bytes in all)


# ---- preparing ----

def prepare(source, out, preprocess: str = "unicode", token: str = "char", val_fraction: float = 0.1,
            overwrite: bool = False, chunk_size: int = CHUNK, progress: Progress | None = None) -> dict:
    """Prepare the text `source` (a file or a named corpus) into the directory `out`; returns prepared.json's
    fields with `seconds`, the wall time."""
    _check_settings(preprocess, token, val_fraction, chunk_size)
    path = corpora.locate(str(source)).resolve()
    size = _check_source(path)
    out = Path(out)
    started = time.perf_counter()
    _check_out(out, overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RnnlabError(f"{out} is being written by another rnnlab process") from None
    try:
        _check_out(out, overwrite)                   # again, under the lock
        _remove_temp_files(out)
        meta = _write(path, size, out, preprocess, token, val_fraction, chunk_size, progress)
    except BaseException:
        if created:                                  # leave no empty directory behind
            (out / LOCK_FILE).unlink(missing_ok=True)
            _remove_temp_files(out)
            _remove_if_empty(out)
        raise
    finally:
        lock.release()
    return {**meta, "seconds": time.perf_counter() - started}


def _check_settings(preprocess: str, token: str, val_fraction: float, chunk_size: int) -> None:
    if preprocess == "legacy":
        raise RnnlabError("--preprocess legacy cannot be prepared: its vocabulary counts only the training split, "
                          "which --max-tokens decides when training; train with --corpus TEXT")
    if preprocess not in MODES or token not in text.TOKEN_TYPES:
        raise RnnlabError(f"--preprocess takes {', '.join(MODES)} and --token {' or '.join(text.TOKEN_TYPES)}, "
                          f"got {preprocess!r} and {token!r}")
    if not 0.0 < val_fraction < 1.0:
        raise RnnlabError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_source(path: Path) -> int:
    """The size of a text file that passes `corpora.check_start` (the checks `corpora.read_text` makes);
    else one line."""
    try:
        with open(path, "rb") as f:
            head = f.read(corpora.HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise RnnlabError(f"cannot read {path}: {e.strerror}") from None
    corpora.check_start(path, head)
    return size


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is not a directory, one that holds something else and no prepared text, one that
    holds a prepared text (without `overwrite`), and a symbolic link among the entries rnnlab writes."""
    if not out.exists():
        if out.is_symlink():
            raise RnnlabError(f"--out {out} is a dangling symbolic link")
        return
    if not out.is_dir():
        raise RnnlabError(f"--out {out} is not a directory")
    entries = [e for e in out.iterdir() if e.name != LOCK_FILE and not TEMP_NAME.fullmatch(e.name)]
    for entry in entries:
        if entry.is_symlink() and (entry.name == META_FILE or TOKENS_NAME.fullmatch(entry.name)):
            raise RnnlabError(f"{entry} is a symbolic link; rnnlab never writes through a link: remove it")
    if not entries:
        return
    if not (out / META_FILE).is_file():
        raise RnnlabError(f"{out} is not empty and holds no prepared text (no {META_FILE}); give a new or empty "
                          "directory as --out")
    if not overwrite:
        raise RnnlabError(f"{out} already holds a prepared text; --overwrite replaces it")


def _remove_if_empty(out: Path) -> None:
    try:
        out.rmdir()
    except OSError:
        pass


def _remove_temp_files(out: Path) -> None:
    """The temporary files a killed `rnnlab prepare` left (under the lock: none is a live writer's)."""
    for entry in out.iterdir():
        if TEMP_NAME.fullmatch(entry.name) and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def _temp(out: Path, kind: str) -> Path:
    fd, name = tempfile.mkstemp(dir=out, prefix=f".{kind}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _write(path: Path, size: int, out: Path, preprocess: str, token: str, val_fraction: float,
           chunk_size: int, progress: Progress | None) -> dict:
    """The two passes, then the token file and prepared.json put in place (see the module docstring)."""
    preprocessed, encoded = _temp(out, "text"), None
    try:
        counts, source_sha, size = _count_pass(path, size, preprocessed, preprocess, token, chunk_size, progress)
        num_tokens = counts.total
        if num_tokens == 0:
            raise RnnlabError(f"{path}: no tokens left after '{preprocess}' preprocessing")
        num_val = int(num_tokens * val_fraction)
        if num_val < 2:
            raise RnnlabError(f"{path}: {num_tokens} tokens leave {num_val} held-out tokens at --val-fraction "
                              f"{val_fraction}; at least 2 are needed")
        vocab = counts.vocab()
        encoded, tokens_sha = _encode_pass(preprocessed, out, vocab, token, chunk_size, progress)
        tokens_file = f"tokens-{tokens_sha[:12]}.bin"
        meta = {"format": FORMAT, "version": VERSION,
                "source": {"path": str(path), "bytes": size, "sha256": source_sha},
                "preprocess": preprocess, "token": token, "val_fraction": val_fraction,
                "num_tokens": num_tokens, "num_val": num_val, "dtype": text.index_dtype(len(vocab)).name,
                "tokens_file": tokens_file, "tokens_sha256": tokens_sha,
                "vocab": {"idx_to_token": vocab.idx_to_token, "token_freqs": [list(tf) for tf in vocab.token_freqs]}}
        meta["checksum"] = _checksum(meta)
        _install(out, encoded, tokens_file, meta)
        return meta
    finally:
        for temp in (preprocessed, encoded):
            if temp is not None:
                temp.unlink(missing_ok=True)


def _install(out: Path, encoded: Path, tokens_file: str, meta: dict) -> None:
    """The token file under its name, then prepared.json, then the token file the previous prepared.json named
    and those a crash left unnamed (whose content hashes to their name: rnnlab wrote them) removed."""
    previous = _named_tokens(out)
    target = out / tokens_file
    if target.is_symlink():
        raise RnnlabError(f"{target} is a symbolic link; rnnlab never writes through a link: remove it")
    os.chmod(encoded, 0o444)
    os.replace(encoded, target)
    atomic_write_json(out / META_FILE, meta)
    for entry in out.iterdir():
        name = TOKENS_NAME.fullmatch(entry.name)
        if name is None or entry.name == tokens_file or not stat.S_ISREG(os.lstat(entry).st_mode):
            continue
        if entry.name == previous or sha256_file(entry).startswith(name[1]):
            entry.unlink(missing_ok=True)


def _named_tokens(out: Path) -> str | None:
    """The token file an existing prepared.json names, if it can be read."""
    try:
        name = json.loads((out / META_FILE).read_text()).get("tokens_file")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and TOKENS_NAME.fullmatch(name) else None


# ---- pass 1: preprocess and count ----

class _Digest:
    """SHA-256 of the data given, in order, computed in a thread beside the caller's work (hashlib releases
    the GIL); one block in flight at a time."""

    def __init__(self):
        self.sha, self.thread = hashlib.sha256(), None

    def update(self, data: bytes) -> None:
        self.join()
        self.thread = threading.Thread(target=self.sha.update, args=(data,))
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def hexdigest(self) -> str:
        self.join()
        return self.sha.hexdigest()


class _Counts:
    """Token counts in first-seen order over a stream of pieces: characters by code point, words by a Counter
    (whose keys keep the order they were first seen in)."""

    def __init__(self, token: str):
        self.token, self.total = token, 0
        self.chars = np.zeros(0, dtype=np.int64)         # count by code point
        self.first: dict[int, int] = {}                   # code point -> position of its first occurrence
        self.words: collections.Counter = collections.Counter()

    def add_codes(self, codes: np.ndarray) -> None:
        piece = _byte_counts(codes) if codes.dtype == np.uint8 else np.bincount(codes)
        if len(piece) > len(self.chars):
            self.chars = np.concatenate([self.chars, np.zeros(len(piece) - len(self.chars), dtype=np.int64)])
        new = np.flatnonzero((piece > 0) & (self.chars[: len(piece)] == 0))
        if len(new):
            self.first.update(zip(new.tolist(), (self.total + _first_positions(codes, new)).tolist()))
        self.chars[: len(piece)] += piece
        self.total += len(codes)

    def add_words(self, words: list[str]) -> None:
        self.words.update(words)
        self.total += len(words)

    def vocab(self) -> text.Vocab:
        if self.token == "word":
            return text.Vocab.from_counts(self.words.items())
        order = sorted(self.first, key=self.first.__getitem__)
        return text.Vocab.from_counts([(chr(c), int(self.chars[c])) for c in order])


def _byte_counts(codes: np.ndarray, block: int = 1 << 22) -> np.ndarray:
    """np.bincount(codes, minlength=256) of a uint8 array, about 3x faster: the bytes counted in pairs, as
    uint16 (a 65,536-bin table that stays in the cache), a block at a time."""
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(codes), block):
        piece = codes[start: start + block]
        even = len(piece) & ~1
        pairs = np.bincount(piece[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
        counts += pairs.sum(axis=0) + pairs.sum(axis=1)
        if even < len(piece):
            counts[piece[-1]] += 1
    return counts


def _first_positions(codes: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Where each of `new` (sorted values, each present in `codes`) first occurs in `codes`: searched in windows
    that double in size, so the values seen early, almost all of them, cost little."""
    first = np.full(len(new), -1, dtype=np.int64)
    start, size = 0, 1 << 12
    while (missing := first < 0).any():
        window = codes[start: start + size]
        hits = np.flatnonzero(np.isin(window, new[missing]))
        values, at = np.unique(window[hits], return_index=True)
        first[np.searchsorted(new, values)] = start + hits[at]
        start, size = start + size, size * 2
    return first


def _count_pass(path: Path, size: int, preprocessed: Path, mode: str, token: str, chunk_size: int,
                progress: Progress | None) -> tuple[_Counts, str, int]:
    """Pass 1: the source chunk by chunk, preprocessed into the file `preprocessed` (UTF-8) and counted;
    returns the counts, the SHA-256 of the source's bytes and how many were read."""
    counts, digest, after_letter = _Counts(token), _Digest(), True
    cut = _word_cut if token == "word" else _char_cut
    with open(path, "rb") as src, open(preprocessed, "wb") as dst:
        for offset, chunk in _chunks(src, chunk_size, cut, digest, skip=corpora.BOM):
            decoded = _decoded(chunk, path, offset)
            if token == "word":
                words = text.preprocess(chunk.decode("ascii") if decoded is None else decoded, mode, "word")
                counts.add_words(words.split())
                dst.write(words.encode("utf-8") + b" ")
            elif decoded is None or mode in ("d2l", "letters"):     # bytes in, ASCII bytes out
                kept, after_letter = ascii_chars.preprocess_piece(chunk, mode, after_letter)
                counts.add_codes(np.frombuffer(kept, dtype=np.uint8))
                dst.write(kept)
            else:
                kept = text.preprocess(decoded, mode)
                counts.add_codes(np.frombuffer(kept.encode("utf-32-le"), dtype="<u4"))
                dst.write(kept.encode("utf-8"))
            if progress:
                progress("reading", offset + len(chunk), size)
        read = src.tell()
    return counts, digest.hexdigest(), read


def _chunks(f, chunk_size: int, cut: Callable[[bytes], int], digest=None,
            skip: bytes = b"") -> Iterator[tuple[int, bytes]]:
    """(offset in the file, bytes) of a binary file, in pieces of about `chunk_size` bytes ending where `cut`
    says (a piece grows while `cut` finds no place), every byte read hashed into `digest`; a leading `skip`
    (the byte-order mark) is left out."""
    head = f.read(len(skip))
    carry, offset = (b"", len(skip)) if skip and head == skip else (head, 0)
    if digest is not None:
        digest.update(head)
    while True:
        block = f.read(chunk_size)
        if digest is not None:
            digest.update(block)
        data = carry + block
        end = cut(data) if block else len(data)
        if end:
            yield offset, data[:end]
            offset, carry = offset + end, data[end:]
        else:
            carry = data
        if not block:
            return


def _char_cut(data: bytes) -> int:
    return ascii_chars.cut(data, 0, len(data))


def _word_cut(data: bytes) -> int:
    """Just after the last line break, else the last space or tab: never inside a word."""
    return max(data.rfind(b"\n"), data.rfind(b" "), data.rfind(b"\t")) + 1


def _decoded(chunk: bytes, path: Path, offset: int) -> str | None:
    """The chunk as text, or None when it is ASCII (its bytes are its characters); one line when it is not
    UTF-8, giving the offending byte's place in the file."""
    if chunk.isascii():
        return None
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RnnlabError(f"{path} is not valid UTF-8 (byte {offset + e.start}: "
                          f"{chunk[e.start:e.start + 1]!r})") from None


# ---- pass 2: encode ----

def _encode_pass(preprocessed: Path, out: Path, vocab: text.Vocab, token: str, chunk_size: int,
                 progress: Progress | None) -> tuple[Path, str]:
    """Pass 2: the preprocessed text to token ids; returns the file that holds them and their SHA-256. When
    every token is an ASCII character, each byte becomes its id in place, through a byte table."""
    table = _ascii_table(vocab) if token == "char" else None
    if table is not None:
        return preprocessed, _translate_in_place(preprocessed, table, chunk_size, progress)
    dtype = text.index_dtype(len(vocab)).newbyteorder("<")
    encode = _word_encoder(vocab, dtype) if token == "word" else _char_encoder(vocab, dtype)
    encoded, digest, size = _temp(out, "tokens"), _Digest(), preprocessed.stat().st_size
    with open(preprocessed, "rb") as src, open(encoded, "wb") as dst:
        for offset, piece in _chunks(src, chunk_size, _word_cut if token == "word" else len):
            _write_ids(dst, digest, encode(piece))
            if progress:
                progress("encoding", offset + len(piece), size)
        _write_ids(dst, digest, encode(b"", final=True))
        _flush(dst)
    return encoded, digest.hexdigest()


def _write_ids(dst, digest: _Digest, ids: bytes) -> None:
    digest.update(ids)
    dst.write(ids)


def _flush(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _ascii_table(vocab: text.Vocab) -> bytes | None:
    """The byte table code -> id of a vocabulary of ASCII characters, else None."""
    codes = [ord(t) for t in vocab.idx_to_token[1:]]
    if max(codes) >= 128:
        return None
    table = bytearray(256)
    for idx, code in enumerate(codes, start=1):
        table[code] = idx
    return bytes(table)


def _translate_in_place(path: Path, table: bytes, chunk_size: int, progress: Progress | None) -> str:
    """Each byte of the file replaced by table[byte], a chunk at a time; returns the new content's SHA-256."""
    digest, size, done = _Digest(), path.stat().st_size, 0
    with open(path, "r+b") as f:
        while block := f.read(chunk_size):
            ids = block.translate(table)
            f.seek(done)
            f.write(ids)
            digest.update(ids)
            done += len(block)
            if progress:
                progress("encoding", done, size)
        _flush(f)
    return digest.hexdigest()


def _char_encoder(vocab: text.Vocab, dtype: np.dtype):
    """piece of preprocessed UTF-8 -> ids as bytes: the pieces decoded (a character may straddle two of them)
    and their code points looked up in a table."""
    codes = [ord(t) for t in vocab.idx_to_token[1:]]
    lut = np.zeros(max(codes) + 1, dtype=dtype)
    lut[codes] = np.arange(1, len(codes) + 1)
    decoder = codecs.getincrementaldecoder("utf-8")()
    return lambda piece, final=False: lut[np.frombuffer(decoder.decode(piece, final).encode("utf-32-le"),
                                                        dtype="<u4")].tobytes()


def _word_encoder(vocab: text.Vocab, dtype: np.dtype):
    """piece of preprocessed text -> ids as bytes (every word is in the vocabulary: it was built from them)."""
    index = vocab.token_to_idx.__getitem__

    def encode(piece: bytes, final: bool = False) -> bytes:
        words = piece.decode("utf-8").split()
        return np.fromiter(map(index, words), dtype=dtype, count=len(words)).tobytes()
    return encode
