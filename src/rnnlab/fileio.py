"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a torn one."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(x: float):
    """`x`, or None where it is not finite (JSON has no inf)."""
    return x if math.isfinite(x) else None


def finite_json(obj):
    """`obj` with every non-finite float (nan, inf, -inf) replaced by None, recursively: strict JSON
    has no NaN or Infinity, and parsers that follow it reject Python's extension."""
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj, **kwargs) -> str:
    """Strict JSON text of `obj`: non-finite floats become null (see `finite_json`)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, dumps_json(obj, indent=1) + "\n")
