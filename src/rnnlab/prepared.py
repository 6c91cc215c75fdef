"""Prepared text: a corpus encoded once into a token file that training reads from disk, for texts of any size.

`rnnlab prepare TEXT --out DIR` reads TEXT in two streaming passes whose memory is bounded by the chunk size,
not by the file: the first preprocesses each chunk, counts its tokens and writes the preprocessed text to a
temporary file; the vocabulary is then the book's `Vocab` over those counts (`<unk>` at 0, then descending
frequency, ties in first-seen order); the second encodes the preprocessed text into the token file.
`rnnlab train --data DIR` reads that file with np.memmap. For the same text and the same preprocess, token and
val_fraction, the tokens, the vocabulary and the split are exactly those `runstate.load_dataset` builds in RAM.

    DIR/prepared.json       the source (path, bytes, SHA-256), preprocess, token, val_fraction, num_tokens and
                            num_val (the last num_val tokens are held out), the vocabulary (idx_to_token,
                            token_freqs), the dtype, the token file's name and SHA-256, and a checksum of all
                            of these, so an edited file is refused
    DIR/tokens-<hash>.bin   num_tokens token ids, little-endian `dtype` (`text.index_dtype`: uint8, uint16 or
                            int32 by vocabulary size), named by the first 12 hex digits of its SHA-256

Chunks. A chunk ends just after a line break or, in a line longer than a chunk, between two ASCII letters
(chars) or after a space or tab (words), so each mode gives what it gives on the whole text: d2l works per
line, letters carries whether the previous chunk ended in a letter, and neither NFC nor '\\r\\n' reaches across
such a cut. d2l and letters work on bytes (`ascii_chars.preprocess_piece`: every byte of a multi-byte UTF-8
character is a non-letter), as do raw and unicode on ASCII chunks; other chunks are decoded and preprocessed by
`text.preprocess`, and their characters mapped by code point with lookup tables. Word tokens split the
preprocessed chunks on whitespace. `legacy` preprocessing is refused: its vocabulary counts only the training
split, which --max-tokens, a training setting, decides.

Writing follows checkpoint.py: the token file is written under a temporary name and renamed to its content's
name, then prepared.json is replaced atomically, and only then is the token file the previous prepared.json
named removed; a crash leaves the old prepared text or the new one, never a mix. A directory holding anything
else and no prepared.json is refused; one process at a time writes a directory (a lock); nothing is written or
read through a symbolic link. `load` checks everything it reads: the checksum, every field, the token file's
size and (unless told not to) its SHA-256.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from filelock import FileLock, Timeout

from . import ascii_chars, corpora, schema, text
from .errors import RnnlabError
from .fileio import atomic_write_json, sha256_file

FORMAT = "rnnlab-prepared"
VERSION = 1
META_FILE = "prepared.json"
LOCK_FILE = ".lock"
CHUNK = 8 << 20                   # bytes read at a time: what bounds the memory of both passes
MODES = ("d2l", "letters", "raw", "unicode")
SETTINGS = ("preprocess", "token", "val_fraction")      # what a run on the prepared text takes from it
TOKENS_NAME = re.compile(r"tokens-([0-9a-f]{12})\.bin")
TEMP_NAME = re.compile(r"\.(tokens|text)\.[^/]+\.tmp")
BOM = b"\xef\xbb\xbf"
Progress = Callable[[str, int, int], None]      # (pass, bytes done, bytes in all)


@dataclass(frozen=True)
class Prepared:
    """A prepared text, checked: its directory, prepared.json's fields, the vocabulary and the tokens (N,),
    a read-only np.memmap of the token file."""
    directory: Path
    meta: dict
    vocab: text.Vocab
    tokens: np.ndarray

    @property
    def source(self) -> Path:
        return Path(self.meta["source"]["path"])

    def check_vocab(self, vocab: text.Vocab | None) -> None:
        """One line when a model's vocabulary (`vocab`, None for none) is not the prepared text's: its token
        ids would mean other characters."""
        if vocab is None or vocab.idx_to_token == self.vocab.idx_to_token:
            return
        ours, theirs = self.vocab.idx_to_token, vocab.idx_to_token
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise RnnlabError(f"the vocabulary of the prepared text in {self.directory} ({len(ours)} tokens) is not "
                          f"the model's ({len(theirs)} tokens; they differ at index {at}); a model reads a "
                          "prepared text only with the vocabulary it was prepared with")


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
    """The size of a text file that is not empty, holds more than a byte-order mark and has no NUL byte in
    its first MiB (the checks `corpora.read_text` makes); else one line."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise RnnlabError(f"cannot read {path}: {e.strerror}") from None
    if not head:
        raise RnnlabError(f"{path} is empty")
    if head == BOM:
        raise RnnlabError(f"{path} is empty (it holds only a byte-order mark)")
    if b"\x00" in head:
        raise RnnlabError(f"{path} looks binary (contains NUL bytes); rnnlab trains on UTF-8 text")
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


def _checksum(meta: dict) -> str:
    """SHA-256 of every field but the checksum itself, as canonical JSON."""
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
        for offset, chunk in _chunks(src, chunk_size, cut, digest, skip=BOM):
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


# ---- reading ----

def load(directory, verify: bool = True) -> Prepared:
    """The prepared text in `directory`, checked (`read_meta`), its token file of the recorded size and, with
    `verify`, SHA-256 (about a second per GB); any problem is one RnnlabError."""
    directory = Path(directory)
    meta = read_meta(directory)
    path = directory / meta["tokens_file"]
    where = f"bad prepared text {directory}"
    try:
        st = os.lstat(path)
    except OSError as e:
        raise RnnlabError(f"{where}: its token file {path.name} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise RnnlabError(f"{where}: its token file {path.name} is not a regular file")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if st.st_size != meta["num_tokens"] * dtype.itemsize:
        raise RnnlabError(f"{where}: its token file {path.name} has {st.st_size:,} bytes, not the "
                          f"{meta['num_tokens'] * dtype.itemsize:,} of {meta['num_tokens']:,} {dtype.name} tokens "
                          "(cut short or replaced); prepare the text again")
    if verify and sha256_file(path) != meta["tokens_sha256"]:
        raise RnnlabError(f"{where}: its token file {path.name} does not match the SHA-256 in {META_FILE} "
                          "(changed since it was prepared); prepare the text again")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    vocab = text.Vocab.from_tokens_list(meta["vocab"]["idx_to_token"], meta["vocab"]["token_freqs"])
    return Prepared(directory.resolve(), meta, vocab, tokens)


def read_meta(directory) -> dict:
    """prepared.json of `directory`, every field checked (one line for anything wrong); the token file is not
    read."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "no such directory" if not directory.exists() else "not a directory"
        raise RnnlabError(f"no prepared text at {directory}: {what} (make one with rnnlab prepare TEXT --out DIR)")
    path = directory / META_FILE
    where = f"bad prepared text {path}"
    if path.is_symlink():
        raise RnnlabError(f"{where}: it is a symbolic link; rnnlab reads only regular files")
    if not path.is_file():
        raise RnnlabError(f"no prepared text in {directory}: it has no {META_FILE} (make one with rnnlab prepare "
                          "TEXT --out DIR)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RnnlabError(f"{where}: cannot read it ({e.strerror})") from None
    meta = schema.mapping(schema.parse_json(raw, where), where, "the file")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise RnnlabError(f"{where}: not an rnnlab prepared text of version {VERSION}")
    if meta.get("checksum") != _checksum(meta):
        raise RnnlabError(f"{where}: its contents were changed after rnnlab prepare wrote them (the checksum does "
                          "not match); prepare the text again")
    _check_fields(meta, where)
    return meta


def _check_fields(meta: dict, where: str) -> None:
    """What a run relies on: the settings, the sizes and split, the vocabulary against its counts, the dtype
    against the vocabulary's size, the token file's name against its SHA-256."""
    source = schema.mapping(meta.get("source"), where, "source")
    schema.string(source.get("path"), where, "source.path")
    _sha256(source.get("sha256"), where, "source.sha256")
    if meta.get("preprocess") not in MODES or meta.get("token") not in text.TOKEN_TYPES:
        raise schema.fail(where, "preprocess and token", f"must be one of {', '.join(MODES)} and char or word")
    val_fraction = meta.get("val_fraction")
    if not (schema.is_number(val_fraction) and 0 < val_fraction < 1):
        raise schema.fail(where, "val_fraction", "must be a number in (0, 1)", val_fraction)
    num_tokens = schema.count(meta.get("num_tokens"), where, "num_tokens")
    if schema.count(meta.get("num_val"), where, "num_val") != int(num_tokens * val_fraction) or meta["num_val"] < 2:
        raise schema.fail(where, "num_val", "must be int(num_tokens x val_fraction) and at least 2")
    vocab = schema.mapping(meta.get("vocab"), where, "vocab")
    idx_to_token = schema.check_vocab(vocab.get("idx_to_token"), meta["token"], where)
    freqs = schema.check_token_freqs(vocab.get("token_freqs"), where)
    counts = [n for _, n in freqs]
    if (idx_to_token != ["<unk>"] + [t for t, _ in freqs if t != "<unk>"] or sum(counts) != num_tokens
            or counts != sorted(counts, reverse=True)):
        raise schema.fail(where, "vocab", "does not match its token_freqs and num_tokens")
    if meta.get("dtype") != text.index_dtype(len(idx_to_token)).name:
        raise schema.fail(where, "dtype", f"must be {text.index_dtype(len(idx_to_token)).name} for "
                                          f"{len(idx_to_token)} tokens", meta.get("dtype"))
    name, digest = meta.get("tokens_file"), _sha256(meta.get("tokens_sha256"), where, "tokens_sha256")
    if not (isinstance(name, str) and TOKENS_NAME.fullmatch(name) and digest.startswith(name[7:19])):
        raise schema.fail(where, "tokens_file", "must be tokens-<the first 12 digits of tokens_sha256>.bin", name)


def _sha256(value, where: str, field: str) -> str:
    if not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise schema.fail(where, field, "must be a SHA-256 in lower-case hex", value)
    return value


# ---- runs on a prepared text ----

def settings(data: dict) -> dict:
    """The data settings (config fields) of a run on the prepared text in data["prepared"] (--data DIR): the
    directory's absolute path, its preprocess, token and val_fraction, and its source as the corpus. A setting
    given that differs from the directory's, or a corpus given beside it, is one line."""
    directory = data["prepared"]
    meta = read_meta(directory)
    if "corpus" in data:
        raise RnnlabError(f"--data {directory} trains on the text prepared there and --corpus names a text: give "
                          "one of them")
    for name in SETTINGS:
        if name in data and data[name] != meta[name]:
            flag = "--" + name.replace("_", "-")
            raise RnnlabError(f"{flag} {data[name]} differs from {directory}, prepared with {flag} {meta[name]}; a "
                              f"prepared text keeps its settings (rnnlab prepare TEXT --out DIR {flag} "
                              f"{data[name]} makes another)")
    return {**data, **{name: meta[name] for name in SETTINGS}, "corpus": meta["source"]["path"],
            "prepared": str(Path(directory).resolve())}


def resolve(cfg):
    """A DataConfig with `prepared` set takes the directory's settings (`settings`, which decide over the
    config's own preprocess, token and val_fraction); one without is returned as it is."""
    if not cfg.prepared:
        return cfg
    given = {"prepared": cfg.prepared}
    return dataclasses.replace(cfg, **settings(given))


def of_checkpoint(ckpt, where, given: str | None = None) -> str | None:
    """The prepared text a run trained on (None for a run that read a text file): `given` (--data) or the
    directory its checkpoint records, as an absolute path, when its token file's SHA-256 and its settings are
    the checkpoint's; else one line."""
    recorded = ckpt.config["data"].get("prepared")
    if recorded is None:
        if given:
            raise RnnlabError(f"{where} trained on {ckpt.config['data']['corpus']}, not on a prepared text: --data "
                              "does not apply to it")
        return None
    directory = given or recorded
    try:
        meta = read_meta(directory)
    except RnnlabError as e:
        raise RnnlabError(f"{e}; {where} trained on the text prepared there (give its new place with --data DIR)"
                          ) from None
    same = meta["tokens_sha256"] == ckpt.extra.get("prepared_tokens_sha256") and all(
        meta[name] == ckpt.config["data"][name] for name in SETTINGS)
    if not same:
        raise RnnlabError(f"{directory} does not hold the prepared text {where} trained on (its token file or "
                          "settings differ from the checkpoint's)")
    return str(Path(directory).resolve())
