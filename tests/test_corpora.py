"""Corpus lookup: search path order, hash checks, downloads (through file:// URLs, never the network),
clear errors for unknown names, and refusing files that are not UTF-8 text."""
import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from rnnlab import corpora
from rnnlab.corpora import CORPORA
from rnnlab.errors import RnnlabError

from conftest import DATA  # noqa: E402  (the corpora folder: $RNNLAB_DATA or ../shared/data)
NAME = "timemachine"
FILENAME = CORPORA[NAME].filename


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    """The shared corpora in RNNLAB_DATA and a private, empty cache (the real ~/.cache is never used)."""
    if not (DATA / FILENAME).is_file():
        pytest.skip(f"corpora not found at {DATA}")
    monkeypatch.setenv("RNNLAB_DATA", str(DATA))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    # Any download attempt that a test does not set up itself must fail fast and offline.
    monkeypatch.setitem(CORPORA, NAME, dataclasses.replace(
        CORPORA[NAME], url=(tmp_path / "no-such-download.txt").as_uri()))


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Three empty directories used as --data-dir, $RNNLAB_DATA and the cache."""
    d = {"data_dir": tmp_path / "data-dir", "env": tmp_path / "env-dir", "cache": corpora.cache_dir()}
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("RNNLAB_DATA", str(d["env"]))
    return d


def good_copy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(DATA / FILENAME, directory / FILENAME))


def bad_copy(directory: Path) -> Path:
    """The corpus's file name, almost the right content (one byte changed): the hash is wrong."""
    directory.mkdir(parents=True, exist_ok=True)
    data = bytearray((DATA / FILENAME).read_bytes())
    data[1000] ^= 0x01
    path = directory / FILENAME
    path.write_bytes(bytes(data))
    return path


def point_url_at(monkeypatch, path: Path) -> str:
    url = path.as_uri()
    monkeypatch.setitem(CORPORA, NAME, dataclasses.replace(CORPORA[NAME], url=url))
    return url


# --- search path ---------------------------------------------------------------------------------

def test_cache_dir_follows_xdg_cache_home(tmp_path):
    assert corpora.cache_dir() == tmp_path / "xdg-cache" / "rnnlab"


def test_search_path_order(dirs):
    assert corpora.search_path(dirs["data_dir"]) == [dirs["data_dir"], dirs["env"], dirs["cache"]]
    assert corpora.search_path(str(dirs["data_dir"])) == [dirs["data_dir"], dirs["env"], dirs["cache"]]
    assert corpora.search_path() == [dirs["env"], dirs["cache"]]


def test_search_path_without_env(dirs, monkeypatch):
    monkeypatch.delenv("RNNLAB_DATA")
    assert corpora.search_path() == [dirs["cache"]]
    assert corpora.search_path(dirs["data_dir"]) == [dirs["data_dir"], dirs["cache"]]


def test_data_dir_wins_over_env_which_wins_over_cache(dirs):
    in_dir, in_env, in_cache = good_copy(dirs["data_dir"]), good_copy(dirs["env"]), good_copy(dirs["cache"])
    assert corpora.find(NAME, dirs["data_dir"]) == in_dir
    assert corpora.locate(NAME, dirs["data_dir"]) == in_dir
    assert corpora.find(NAME) == in_env
    in_env.unlink()
    assert corpora.find(NAME, dirs["data_dir"]) == in_dir
    assert corpora.find(NAME) == in_cache
    in_dir.unlink()
    assert corpora.find(NAME, dirs["data_dir"]) == in_cache


def test_nothing_anywhere_is_none(dirs):
    assert corpora.find(NAME, dirs["data_dir"]) is None


def test_file_with_wrong_hash_is_skipped(dirs):
    bad_copy(dirs["data_dir"])
    in_env = good_copy(dirs["env"])
    assert corpora.find(NAME, dirs["data_dir"]) == in_env
    text, path, _ = corpora.load(NAME, dirs["data_dir"])
    assert path == in_env
    assert text == (DATA / FILENAME).read_text(encoding="utf-8")


def test_only_wrong_hash_files_are_named_with_their_hash(dirs):
    for d in dirs.values():
        bad_copy(d)
    assert corpora.find(NAME, dirs["data_dir"]) is None
    with pytest.raises(RnnlabError) as e:
        corpora.locate(NAME, dirs["data_dir"], allow_download=False)
    msg = str(e.value)
    assert "not found" not in msg and "but its SHA-256 is" in msg and "download disabled" in msg
    assert str(dirs["data_dir"]) in msg and str(dirs["env"]) in msg and str(dirs["cache"]) in msg
    assert "RNNLAB_DATA" in msg


# --- download --------------------------------------------------------------------------------------

def test_download_file_url_saves_into_cache(dirs, monkeypatch):
    point_url_at(monkeypatch, DATA / FILENAME)
    path = corpora.download(NAME)
    assert path == dirs["cache"] / FILENAME
    assert path.read_bytes() == (DATA / FILENAME).read_bytes()
    assert sorted(p.name for p in dirs["cache"].iterdir()) == [FILENAME]     # no .part left behind
    assert corpora.find(NAME) == path


def test_download_explicit_dest_and_url(tmp_path):
    dest = tmp_path / "elsewhere"
    path = corpora.download(NAME, dest, url=(DATA / FILENAME).as_uri())
    assert path == dest / FILENAME
    assert corpora.sha256_file(path) == CORPORA[NAME].sha256


def test_locate_downloads_when_missing(dirs, monkeypatch):
    point_url_at(monkeypatch, DATA / FILENAME)
    assert not (dirs["cache"] / FILENAME).exists()
    path = corpora.locate(NAME, dirs["data_dir"])
    assert path == dirs["cache"] / FILENAME
    assert corpora.sha256_file(path) == CORPORA[NAME].sha256


def test_download_wrong_content_raises_and_saves_nothing(dirs, monkeypatch, tmp_path):
    wrong = tmp_path / "served" / FILENAME
    wrong.parent.mkdir()
    wrong.write_text("not the time machine\n", encoding="utf-8")
    url = point_url_at(monkeypatch, wrong)
    with pytest.raises(RnnlabError) as e:
        corpora.download(NAME)
    msg = str(e.value)
    assert url in msg and CORPORA[NAME].sha256 in msg and "not saved" in msg
    assert list(dirs["cache"].iterdir()) == []
    assert corpora.find(NAME) is None


def test_download_unreachable_url_raises(dirs):
    with pytest.raises(RnnlabError, match="could not download"):
        corpora.download(NAME)
    assert list(dirs["cache"].iterdir()) == []


def test_locate_reports_failed_download(dirs):
    with pytest.raises(RnnlabError) as e:
        corpora.locate(NAME, dirs["data_dir"])
    msg = str(e.value)
    assert "could not download" in msg and FILENAME in msg and str(dirs["data_dir"]) in msg


# --- names and paths -------------------------------------------------------------------------------

def test_unknown_name_lists_known_corpora(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RnnlabError) as e:
        corpora.locate("no_such_corpus")
    msg = str(e.value)
    assert "no_such_corpus" in msg
    for name in CORPORA:
        assert name in msg


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(RnnlabError, match="is not a file"):
        corpora.locate(str(tmp_path))


def test_plain_file_path_is_used_as_is(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("hello world\n", encoding="utf-8")
    assert corpora.locate(str(p)) == p
    assert corpora.load(str(p))[:2] == ("hello world\n", p)


# --- read_text -------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"some text\x00more text", "binary"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
    (b"\xff\xfehi", "not valid UTF-8"),
])
def test_read_text_refuses_non_text(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(RnnlabError, match=match) as e:
        corpora.read_text(p)
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_read_text_missing_file(tmp_path):
    with pytest.raises(RnnlabError, match="cannot read"):
        corpora.read_text(tmp_path / "missing.txt")


def test_read_text_accepts_utf8(tmp_path):
    p = tmp_path / "ok.txt"
    p.write_bytes("café — naïve\n".encode("utf-8"))
    assert corpora.read_text(p) == "café — naïve\n"


def test_load_refuses_binary_path(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(os.urandom(64) + b"\x00")
    with pytest.raises(RnnlabError, match="binary"):
        corpora.load(str(p))


# --- status ----------------------------------------------------------------------------------------

def test_status_shared_data_all_ok():
    rows = {r["name"]: r for r in corpora.status()}
    assert list(rows) == list(CORPORA)
    for name, row in rows.items():
        if (DATA / CORPORA[name].filename).is_file():
            assert row["path"] == str(DATA / CORPORA[name].filename)
            assert row["sha256_ok"] is True
        assert row["url"] == CORPORA[name].url and row["title"] == CORPORA[name].title


def test_status_found_and_hash(dirs):
    rows = {r["name"]: r for r in corpora.status(dirs["data_dir"])}
    assert rows[NAME]["path"] is None and rows[NAME]["sha256_ok"] is False

    bad = bad_copy(dirs["data_dir"])
    rows = {r["name"]: r for r in corpora.status(dirs["data_dir"])}
    assert rows[NAME]["path"] == str(bad) and rows[NAME]["sha256_ok"] is False

    good = good_copy(dirs["cache"])      # a good copy further along the path is the one reported
    rows = {r["name"]: r for r in corpora.status(dirs["data_dir"])}
    assert rows[NAME]["path"] == str(good) and rows[NAME]["sha256_ok"] is True
