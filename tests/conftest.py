"""Shared fixtures: the corpora folder (../shared/data beside the checkout, or $RNNLAB_DATA)."""
import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("RNNLAB_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data").resolve()


@pytest.fixture(autouse=True)
def data_env(monkeypatch, tmp_path_factory):
    """Point rnnlab at the shared corpora and at a private cache: no test downloads or touches ~/.cache."""
    monkeypatch.setenv("RNNLAB_DATA", str(DATA))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))     # `rnnlab train` without --out writes ./runs/...


@pytest.fixture
def needs_corpora():
    """Skip a test (use with `pytestmark = pytest.mark.usefixtures("needs_corpora")`) where the corpora are not."""
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")


@pytest.fixture(scope="session")
def timemachine_text():
    path = DATA / "timemachine.txt"
    if not path.is_file():
        pytest.skip(f"corpus not found at {path}; set RNNLAB_DATA")
    return path.read_text()
