"""The result store: one JSON file per finished cell.

A cell's identity is a stable hash of the parts of its resolved config that
change its numbers (model, quantization spec, method, suite, backend, seed,
and calibration when the cell uses it).  The file ``<label>-<hash>.json`` in
``results/<sweep name>/`` is written atomically (temporary file + rename), so
an interrupted run never leaves a half-written result, and a rerun skips
every cell whose file is already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FINISHED = ("ok", "skipped")


def stable_hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("qeval", "torch", "transformers", "lm_eval", "datasets", "gguf", "hydra-core"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


class ResultStore:
    def __init__(self, root: str | os.PathLike, sweep_name: str) -> None:
        self.dir = Path(root) / sweep_name

    def path_for(self, cell_hash: str, label: str) -> Path:
        return self.dir / f"{_safe(label)}-{cell_hash}.json"

    def find(self, cell_hash: str) -> Path | None:
        matches = sorted(self.dir.glob(f"*-{cell_hash}.json"))
        return matches[0] if matches else None

    def finished(self, cell_hash: str) -> dict[str, Any] | None:
        """The record of a finished cell, or None (missing, failed, or unreadable)."""
        path = self.find(cell_hash)
        if path is None:
            return None
        record = _read_record(path)
        if record is None:
            log.warning("result file %s is unreadable; the cell will be recomputed", path)
            return None
        return record if record.get("status") in FINISHED else None

    def write(self, record: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for(record["hash"], record["label"])
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is unreadable or not an object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) else None


def iter_records(root: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every readable record under ``root`` (a sweep folder or a folder of sweeps)."""
    for path in sorted(Path(root).rglob("*.json")):
        if path.name.startswith(".") or ".hydra" in path.parts:
            continue
        record = _read_record(path)
        if record is None:
            log.warning("skipping unreadable result file %s", path)
            continue
        if record.get("schema_version") == SCHEMA_VERSION:
            record["_path"] = str(path)
            yield record
