"""Per-item outcomes: what every task scored, item by item, kept beside the cell's record.

Aggregate scores hide what the paired analysis needs: which items changed between the
unquantized and the quantized model (flips), and the per-item differences a paired test
reads.  So every task of every cell also yields a small columnar table, one row per item:

* ``id`` (str, required): stable across the cells of a suite (derived from the data, never
  from model output), so two cells' tables join on it;
* a column named like each per-item metric (lm-eval: ``acc``, ``acc_norm``,
  ``exact_match[strict-match]`` -- the names the cell's metrics use), whose mean over the
  items is the reported score;
* multiple choice: ``target`` (gold index), ``choice`` (the highest log-likelihood choice),
  ``gold_ll`` (the gold continuation's log-likelihood); generation: ``answer`` (the
  filtered answer, at most :data:`ANSWER_CHARS` characters); perplexity: one row per window.

No prompts and no full generations are kept: the default sweep's tables are a few hundred
kilobytes.  The tables of one cell are one gzip-compressed JSON file next to the record,
``<record stem>.items.json.gz``, written atomically *before* the record, so a record on disk
always has its items; the tasks of an unfinished cell keep theirs in the partial file.
"""

from __future__ import annotations

import gzip
import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qeval.files import atomic_file

ITEMS_VERSION = 1
ANSWER_CHARS = 80
SUFFIX = ".items.json.gz"

Columns = dict[str, list[Any]]


def items_path(record_path: Path) -> Path:
    """Where the per-item tables of the record at ``record_path`` live."""
    return record_path.with_name(record_path.stem + SUFFIX)


def _scalar(value: Any) -> Any:
    """A JSON scalar: numpy and torch numbers become Python ones, non-finite floats None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalars (np.bool_ included)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)[:ANSWER_CHARS]


def check_columns(columns: Mapping[str, list[Any]]) -> Columns:
    """Validate a columnar table (equal lengths, a unique string ``id``); JSON scalars out."""
    if "id" not in columns:
        raise ValueError(f"per-item columns need an 'id' column (got {sorted(columns)})")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-item columns differ in length: {lengths}")
    ids = [str(i) for i in columns["id"]]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"per-item column 'id' repeats {dup!r}")
    out: Columns = {"id": ids}
    for name, values in columns.items():
        if name != "id":
            out[name] = [_scalar(v) for v in values]
    return out


def metric_column(metric: str, filter_key: str) -> str:
    """The name of lm-eval's metric under a filter, in a cell's metrics and its item tables."""
    return metric if filter_key in ("none", "") else f"{metric}[{filter_key}]"


def lm_eval_items(samples: Mapping[str, list[dict[str, Any]]]) -> Columns:
    """The per-item table of one lm-eval task (or group) from ``simple_evaluate``'s
    ``log_samples`` output: one row per document, the filters' metrics side by side."""
    rows: dict[str, dict[str, Any]] = {}
    grouped = len(samples) > 1
    for subtask, examples in samples.items():
        for ex in examples:
            item_id = f"{subtask}/{ex['doc_id']}" if grouped else str(ex["doc_id"])
            row = rows.setdefault(item_id, {"id": item_id})
            filter_key = str(ex.get("filter", "none"))
            for metric in ex.get("metrics", []):
                if metric in ex:
                    row[metric_column(metric, filter_key)] = ex[metric]
            row.update(_response_columns(ex))
    table: Columns = {}
    names = list(dict.fromkeys(name for row in rows.values() for name in row))
    for name in names:
        table[name] = [row.get(name) for row in rows.values()]
    return check_columns(table) if table else {"id": []}


def _response_columns(ex: dict[str, Any]) -> dict[str, Any]:
    """Chosen answer and gold log-likelihood (multiple choice / loglikelihood), or the short
    filtered answer (generation)."""
    resps = ex.get("filtered_resps") or []
    target = ex.get("target")
    lls = [r[0] for r in resps if isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], (int, float))]
    if lls and len(lls) == len(resps):
        if len(lls) == 1:  # one continuation (loglikelihood tasks such as LAMBADA)
            return {"gold_ll": float(lls[0]), "greedy": bool(resps[0][1])}
        out: dict[str, Any] = {"choice": max(range(len(lls)), key=lls.__getitem__)}
        gold = _gold_index(target, len(lls))
        if gold is not None:
            out.update(target=gold, gold_ll=float(lls[gold]))
        return out
    if resps and isinstance(resps[0], str):
        return {"answer": resps[0][:ANSWER_CHARS]}
    return {}


def _gold_index(target: Any, n_choices: int) -> int | None:
    try:
        gold = int(target)
    except (TypeError, ValueError):
        return None
    return gold if 0 <= gold < n_choices else None


def write_items(path: Path, tables: Mapping[str, Columns]) -> int:
    """Write a cell's per-item tables atomically (temporary file, fsync, rename); its size."""
    blob = json.dumps({"version": ITEMS_VERSION, "tasks": dict(tables)}, separators=(",", ":")).encode()
    with atomic_file(path, SUFFIX) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(blob)
    return path.stat().st_size


def read_items(path: Path) -> dict[str, Columns] | None:
    """A cell's per-item tables by task, or None when the file is missing or unreadable."""
    try:
        with gzip.open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(data, dict) or data.get("version") != ITEMS_VERSION:
        return None
    tasks = data.get("tasks")
    return tasks if isinstance(tasks, dict) else None
