"""The result store: one JSON file per finished cell.

A cell's identity is a stable hash of the parts of its resolved config that
change its numbers (model, quantization spec, method, suite, backend, seed,
and calibration when the cell uses it).  The file ``<label>-<hash>.json`` in
``results/<sweep name>/`` is written atomically (temporary file + rename), so
an interrupted run never leaves a half-written result, and a rerun skips
every cell whose file is already there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qeval.errors import ResultsNotWritable
from qeval.eval.items import items_path, read_items, write_items
from qeval.files import atomic_file

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

    def paths_by_hash(self) -> dict[str, Path]:
        """Every result file of the sweep by cell hash, from one directory listing (``find``
        lists the folder once per call; a sweep-wide question asks this once)."""
        # reverse order, so that for a hash with two files the first in name order wins, as in find
        return {
            path.stem.rpartition("-")[2]: path
            for path in sorted(self.dir.glob("*.json"), reverse=True)
            if not path.name.startswith(".")
        }

    def finished(self, cell_hash: str) -> dict[str, Any] | None:
        """The record of a finished cell, or None (missing, failed, or unreadable, or its
        per-item file is: a record's numbers are recomputed from it, so both are needed)."""
        path = self.find(cell_hash)
        if path is None:
            return None
        record = read_record(path)
        if record is None:
            log.warning("result file %s is unreadable; the cell will be recomputed", path)
            return None
        if record.get("status") not in FINISHED:
            return None
        if record.get("items") and read_items(items_path(path)) is None:
            log.warning("per-item file of %s is missing or unreadable; the cell will be recomputed", path)
            return None
        if _lacks_coverage(record):
            log.warning(
                "%s quantized weights before qeval counted what it quantized (MoE experts could have "
                "stayed in full precision); the cell will be recomputed",
                path,
            )
            return None
        return record

    def check_writable(self) -> None:
        """ResultsNotWritable when a file cannot be created in the sweep folder now (a folder
        turned read-only, a full disk), naming the folder and the error."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".tmp-probe-"):
                pass
        except OSError as err:
            raise ResultsNotWritable(_not_writable(self.dir, err)) from err

    def write(self, record: dict[str, Any], items: Mapping[str, Any] | None = None) -> Path:
        """Write a cell's record, and first its per-item tables (``items``, by task) when
        given, so that a record on disk always has them (qeval.eval.items).  A folder that
        cannot be written raises ResultsNotWritable."""
        try:
            return self._write(record, items)
        except OSError as err:
            raise ResultsNotWritable(_not_writable(self.dir, err)) from err

    def _write(self, record: dict[str, Any], items: Mapping[str, Any] | None) -> Path:
        path = self.path_for(record["hash"], record["label"])
        if items:
            size = write_items(items_path(path), items)
            record["items"] = {
                "file": items_path(path).name,
                "bytes": size,
                "rows": {task: len(table["id"]) if table else None for task, table in items.items()},
            }
        write_json_atomically(path, record)
        if record.get("status") in FINISHED:  # a failed cell keeps its finished tasks for the retry
            self.drop_partial(record["hash"])
        return path

    # -- tasks finished inside a cell that has not finished (kept across a crash or kill)

    def _partial_path(self, cell_hash: str) -> Path:
        return self.dir / ".partial" / f"{cell_hash}.json"

    def partial(self, cell_hash: str, fingerprint: str) -> dict[str, Any]:
        """Per finished task of an unfinished cell: {"metrics": ..., "seconds": ...}.

        Kept only when the model weights (``fingerprint``) and qeval's version are
        the ones that produced them, so a reused score is the score a fresh run gives.
        """
        data = read_record(self._partial_path(cell_hash))
        if not data or data.get("fingerprint") != fingerprint or data.get("qeval") != qeval_version():
            return {}
        return data.get("tasks", {})

    def save_partial(self, cell_hash: str, fingerprint: str, tasks: dict[str, Any]) -> None:
        write_json_atomically(
            self._partial_path(cell_hash), {"fingerprint": fingerprint, "qeval": qeval_version(), "tasks": tasks}
        )

    def drop_partial(self, cell_hash: str) -> None:
        self._partial_path(cell_hash).unlink(missing_ok=True)

    def remove_stale_temporaries(self, older_than_s: float = 600.0) -> list[Path]:
        """Delete temporary files left by a writer that was killed mid-write.

        Writes take milliseconds, so a temporary older than ``older_than_s`` has
        no live writer (a parallel worker's fresh one is left alone).
        """
        removed = []
        now = time.time()
        for tmp in [*self.dir.glob(".tmp-*"), *self.dir.glob(".partial/.tmp-*")]:
            try:
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed.append(tmp)
            except FileNotFoundError:
                pass
        return removed


def _not_writable(folder: Path, err: OSError) -> str:
    return f"the results folder {folder} cannot be written ({type(err).__name__}: {err.strerror or err})"


@functools.cache
def qeval_version() -> str:
    return package_versions().get("qeval", "")


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Temporary file in the same folder, fsync, rename: readers see the old file or the new one."""
    with atomic_file(path, ".json") as f:  # serialized inside: a record that cannot be leaves no file
        f.write(json.dumps(data, indent=1, sort_keys=True, default=str).encode())


def _lacks_coverage(record: dict[str, Any]) -> bool:
    """An ok weight-quantized record written before coverage accounts existed (qeval < 0.3)."""
    tensor_type = str((record.get("cell") or {}).get("tensor_type", ""))
    return record.get("status") == "ok" and "W" in tensor_type and "coverage" not in record


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is unreadable or not an object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) else None


def iter_records(root: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every readable record under ``root`` (a sweep folder or a folder of sweeps)."""
    for path in sorted(Path(root).rglob("*.json")):
        # qeval's own folders (.hydra, .partial, .claims, .reference) hold no records
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        record = read_record(path)
        if record is None:
            log.warning("skipping unreadable result file %s", path)
            continue
        if record.get("schema_version") == SCHEMA_VERSION:
            record["_path"] = str(path)
            yield record


def record_items(record: dict[str, Any]) -> dict[str, Any] | None:
    """The per-item tables (by task) of a record read by :func:`iter_records`, or None when
    it has none (failed or skipped cells, records written before qeval 0.3).

    The report's frames each read them (verdicts, members of groups, constant answers), so a
    file is decompressed once per version on disk: cached by path, size and modification
    time.  The tables returned are shared; callers read them and build new ones."""
    if not record.get("items") or "_path" not in record:
        return None
    path = items_path(Path(record["_path"]))
    try:
        stat = path.stat()
    except OSError:
        return None
    return _cached_items(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_items(path: str, size: int, mtime_ns: int) -> dict[str, Any] | None:
    """:func:`read_items` of one version of a file (``size`` and ``mtime_ns`` key the cache)."""
    return read_items(Path(path))
