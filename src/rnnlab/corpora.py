"""Named corpora and any UTF-8 text file: where they are looked for, how they are checked, how they are read.

A named corpus is searched along a path: `--data-dir`, then `$RNNLAB_DATA`, then the user cache dir
(`$XDG_CACHE_HOME/rnnlab` or `~/.cache/rnnlab`). If it is in none of them it is downloaded into the cache
from its canonical URL and its SHA-256 checked; a file with the wrong hash is never used.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import RnnlabError
from .fileio import sha256_file


@dataclass(frozen=True)
class Corpus:
    name: str
    filename: str
    sha256: str
    url: str
    title: str


CORPORA = {c.name: c for c in (
    Corpus("timemachine", "timemachine.txt",
           "8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516",
           "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
           "The Time Machine, H. G. Wells (d2l's file)"),
    Corpus("war_of_the_worlds", "war_of_the_worlds.txt",
           "cea0a21fedcf33b5020258bda321d2b9c9f7c28e3604e3328782d37a4b5be4dd",
           "https://raw.githubusercontent.com/phudgins/markov/d0ea005943f29687f7d63241ac14eff125e8cc38/"
           "war_of_the_worlds.txt",
           "The War of the Worlds, H. G. Wells"),
    Corpus("tinyshakespeare", "tinyshakespeare.txt",
           "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
           "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
           "data/tinyshakespeare/input.txt",
           "Tiny Shakespeare (char-rnn)"),
)}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnnlab"


def search_path(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for named corpora, in order."""
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("RNNLAB_DATA"):
        dirs.append(Path(os.environ["RNNLAB_DATA"]))
    dirs.append(cache_dir())
    return dirs


def copies(name: str, data_dir=None) -> Iterator[tuple[Path, str]]:
    """(path, sha256) of each file with the corpus's file name along the search path, in order, hashed
    only when reached."""
    for d in search_path(data_dir):
        path = d / CORPORA[name].filename
        if path.is_file():
            yield path, sha256_file(path)


def find(name: str, data_dir=None) -> Path | None:
    """The first file along the search path with the corpus's name and the right hash, or None."""
    return next((path for path, digest in copies(name, data_dir) if digest == CORPORA[name].sha256), None)


def canonical(name_or_path: str) -> str:
    """A corpus as a run records it: a named corpus stays its name; a file becomes its absolute, resolved path,
    so the run finds it again from any directory. Anything else is left as given, for `locate` to refuse."""
    if name_or_path in CORPORA:
        return name_or_path
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_file() else name_or_path


def find_by_hash(sha256: str, filename: str, dirs) -> Path | None:
    """The first file named `filename` in `dirs` whose bytes hash to `sha256`, as an absolute path, or None.
    A run records its corpus file's SHA-256, so a file that moved is recognised wherever it is found; a file
    of the same name with other contents is never taken for it."""
    seen = set()
    for d in dirs:
        path = (Path(d).expanduser() / filename).resolve()
        if path in seen:
            continue
        seen.add(path)
        try:
            if path.is_file() and sha256_file(path) == sha256:
                return path
        except OSError:          # unreadable: not the file looked for
            continue
    return None


def download(name: str, dest_dir: Path | None = None, url: str | None = None) -> Path:
    """Fetch a named corpus into `dest_dir` (the cache by default), checking its SHA-256 before keeping it."""
    corpus = CORPORA[name]
    dest_dir = Path(dest_dir) if dest_dir else cache_dir()
    url = url or corpus.url
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (OSError, ValueError) as e:
        raise RnnlabError(f"could not download corpus {name!r} from {url}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != corpus.sha256:
        raise RnnlabError(f"downloaded {url} has sha256 {digest}, expected {corpus.sha256}; not saved")
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / corpus.filename
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def locate(name_or_path: str, data_dir=None, allow_download: bool = True) -> Path:
    """Resolve a corpus name or a file path to an existing file, downloading a named corpus if needed."""
    if name_or_path in CORPORA:
        path = find(name_or_path, data_dir)
        if path is not None:
            return path
        if allow_download:
            try:
                return download(name_or_path)
            except RnnlabError as e:
                reason = str(e)
        else:
            reason = "download disabled"
        looked = ", ".join(str(d) for d in search_path(data_dir))
        corpus = CORPORA[name_or_path]
        wrong = [(path, digest) for path, digest in copies(name_or_path, data_dir) if digest != corpus.sha256]
        if wrong:
            (path, digest), others = wrong[0], "".join(f" (also wrong: {p})" for p, _ in wrong[1:])
            raise RnnlabError(
                f"corpus {name_or_path!r}: found {path} but its SHA-256 is {digest}, expected {corpus.sha256}"
                f"{others}: a different or damaged file, and {reason}; replace it with the original "
                f"{corpus.filename} or point RNNLAB_DATA at a directory that holds it")
        raise RnnlabError(
            f"corpus {name_or_path!r} not found (looked in: {looked}) and {reason}; put {corpus.filename} "
            f"(sha256 {corpus.sha256[:12]}...) in one of those directories or set RNNLAB_DATA")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise RnnlabError(f"{path} is not a file")
    known = ", ".join(CORPORA)
    raise RnnlabError(f"no such corpus or file: {name_or_path!r} (named corpora: {known})")


def read_text(path: Path) -> str:
    """Read a whole text file as UTF-8, refusing empty, binary and non-UTF-8 files with a clear message."""
    return _read(path)[0]


def _read(path: Path) -> tuple[str, str]:
    """(text, sha256 of the bytes read). A byte-order mark at the start (editors on Windows write one) is
    dropped: it is not part of the text, and would otherwise become a token."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RnnlabError(f"cannot read {path}: {e.strerror}") from None
    check_start(path, data[:HEAD_BYTES])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RnnlabError(f"{path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    return text.removeprefix("\ufeff"), hashlib.sha256(data).hexdigest()


HEAD_BYTES = 1 << 20        # how much of a file is looked at for NUL bytes
BOM = b"\xef\xbb\xbf"        # UTF-8's byte-order mark


def check_start(path, head: bytes) -> None:
    """Refuse a text file from its first HEAD_BYTES bytes: empty, only a byte-order mark, or binary (a NUL
    byte)."""
    if not head:
        raise RnnlabError(f"{path} is empty")
    if head == BOM:
        raise RnnlabError(f"{path} is empty (it holds only a byte-order mark)")
    if b"\x00" in head:
        raise RnnlabError(f"{path} looks binary (contains NUL bytes); rnnlab trains on UTF-8 text")


def load(name_or_path: str, data_dir=None) -> tuple[str, Path, str]:
    """The text of a corpus, the file it came from, and the SHA-256 of the bytes read."""
    path = locate(name_or_path, data_dir)
    text, digest = _read(path)
    return text, path, digest


def status(data_dir=None) -> list[dict]:
    """For each named corpus: where it was found (if anywhere) and whether its hash is right."""
    rows = []
    for name, corpus in CORPORA.items():
        found, ok = None, False
        for path, digest in copies(name, data_dir):
            found, ok = path, digest == corpus.sha256
            if ok:
                break
        rows.append({"name": name, "title": corpus.title, "path": str(found) if found else None,
                     "sha256_ok": ok, "url": corpus.url})
    return rows
