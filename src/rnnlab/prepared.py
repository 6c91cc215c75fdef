"""Prepared text: a corpus encoded once into a token file that training reads from disk, for texts of any size.
This module is the format and its reading; prepare.py writes it.

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

import dataclasses
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema, text
from .errors import RnnlabError
from .fileio import sha256_file

FORMAT = "rnnlab-prepared"
VERSION = 1
META_FILE = "prepared.json"
LOCK_FILE = ".lock"
MODES = ("d2l", "letters", "raw", "unicode")
SETTINGS = ("preprocess", "token", "val_fraction")      # what a run on the prepared text takes from it
TOKENS_NAME = re.compile(r"tokens-([0-9a-f]{12})\.bin")
TEMP_NAME = re.compile(r"\.(tokens|text)\.[^/]+\.tmp")


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


def _checksum(meta: dict) -> str:
    """SHA-256 of every field but the checksum itself, as canonical JSON."""
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
