"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

A leaf module (standard library only), so that results, per-item tables, caches and data
downloads share one writer: an interrupted or killed run leaves at most a ``.tmp-*`` file,
which nothing reads (the results store removes stale ones).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` when the block ends without an exception.

    The temporary file lies in the same folder (so the rename is atomic), named
    ``.tmp-*<suffix>`` (default: ``path``'s own suffix); it is fsynced before the rename and
    given the mode a plain ``open`` would give (mkstemp creates 0600; results are meant to be
    shared).  On an exception it is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix if suffix is None else suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, blob: bytes, suffix: str | None = None) -> None:
    """``path.write_bytes(blob)``, atomically (:func:`atomic_file`)."""
    with atomic_file(path, suffix) as f:
        f.write(blob)
