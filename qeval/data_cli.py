"""``qeval-data``: materialise a data folder for machines without internet access.

``qeval-data fetch --suite quick --dir DIR`` works out which files the suite's tasks read
(the suite config composed as a cell would get it, each entry's declared data files, and
the calibration corpus), downloads each from its pinned source in
:mod:`qeval.data_sources` (sha256-checked), writes it under ``DIR`` in exactly the layout
``QEVAL_DATA_DIR`` expects, and records a provenance line per file in
``DIR/PROVENANCE.qeval.tsv``.  A file already in ``DIR`` with the right content is not
downloaded again, so a second run only checks.  ``qeval-data sources`` prints the table.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qeval.data import (
    TEXT_DATASETS,
    DataNotFoundError,
    cached_file,
    fetch_file,
    has_content,
    local_file,
)
from qeval.data_sources import SOURCES
from qeval.files import write_bytes_atomically

PROVENANCE_FILE = "PROVENANCE.qeval.tsv"
PROVENANCE_HEADER = ("path", "source", "revision", "sha256", "fetched")
DEFAULT_SUITE = "quick"


def suite_files(suite: str, manager: Any = None) -> dict[str, list[str]]:
    """Per suite entry, the table files it reads (plus ``calibration`` for the calib corpus).

    The suite is composed exactly as a cell gets it, so a suite's own parameters (MT-Bench's
    judge files, LongEval's sizes, the task self-calibration runs) decide what is needed."""
    from qeval.cell import build_cell
    from qeval.cli import compose_config
    from qeval.eval.registry import discover_native, lm_eval_task_files
    from qeval.eval.suite import resolve_kind

    cfg = build_cell(compose_config([f"suite={suite}"]))
    include = cfg.include
    native = discover_native(include)
    out: dict[str, list[str]] = {}
    for name, task in cfg.suite.tasks.items():
        kind = resolve_kind(task, include)
        if kind == "perplexity":
            ds = TEXT_DATASETS.get(task.dataset)
            out[name] = [ds.local] if ds is not None and ds.local in SOURCES else []
        elif kind == "native":
            out[name] = list(native[task.task](**task.params).data_files(include))
        else:
            out[name] = lm_eval_task_files(task.task, include, manager)
    calib = TEXT_DATASETS.get(str(cfg.calib.dataset))
    if calib is not None and calib.local in SOURCES:
        out["calibration"] = [calib.local]
    return out


def _read_provenance(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        return {}
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return {r[0]: r for r in rows if len(r) == len(PROVENANCE_HEADER)}


def _write_provenance(path: Path, rows: dict[str, list[str]]) -> None:
    lines = ["\t".join(PROVENANCE_HEADER)] + ["\t".join(rows[k]) for k in sorted(rows)]
    write_bytes_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))


def fetch(files: Iterable[str], root: Path, out: Any = sys.stdout) -> list[tuple[str, str, int]]:
    """Put each table file under ``root`` (present ones are checked, not downloaded again),
    print a line per file, record provenance.  Returns (path, status, bytes) per file."""
    root.mkdir(parents=True, exist_ok=True)
    wanted = sorted(dict.fromkeys(files))
    prov_path = root / PROVENANCE_FILE
    prov = _read_provenance(prov_path)
    done: list[tuple[str, str, int]] = []
    failed: list[str] = []
    width = len(str(len(wanted)))
    for i, rel in enumerate(wanted, 1):
        src = SOURCES[rel]
        dest = root / rel
        if has_content(dest, src.sha256):
            status = "present"
        else:
            copy = local_file(rel) or cached_file(rel)  # already on this machine, same content
            try:
                if copy is not None and copy.resolve() != dest.resolve() and has_content(copy, src.sha256):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(copy, dest)
                    status = "copied"
                else:
                    fetch_file(rel, root)
                    status = "downloaded"
            except DataNotFoundError as err:
                failed.append(rel)
                print(f"[{i:>{width}}/{len(wanted)}] {rel}  FAILED: {err}", file=out, flush=True)
                continue
        if status != "present" or rel not in prov:
            prov[rel] = [rel, src.describe, src.revision or "unpinned", src.sha256, time.strftime("%Y-%m-%d")]
        size = dest.stat().st_size
        done.append((rel, status, size))
        print(f"[{i:>{width}}/{len(wanted)}] {rel}  {status}  {size} B  sha256 {src.sha256[:12]}", file=out, flush=True)
    _write_provenance(prov_path, prov)
    _summary(done, failed, root, out)
    if failed:
        raise DataNotFoundError(f"{len(failed)} file(s) could not be fetched: {', '.join(failed)}")
    return done


def _summary(done: Sequence[tuple[str, str, int]], failed: Sequence[str], root: Path, out: Any) -> None:
    groups: dict[str, list[tuple[str, str, int]]] = {}
    for rel, status, size in done:
        groups.setdefault(rel.split("/", 1)[0], []).append((rel, status, size))
    print(f"\n{'folder':<18} {'files':>5} {'downloaded':>10} {'copied':>6} {'present':>7} {'MB':>8}", file=out)
    for folder in sorted(groups):
        rows = groups[folder]
        count = {s: sum(1 for _, st, _ in rows if st == s) for s in ("downloaded", "copied", "present")}
        mb = sum(size for _, _, size in rows) / 1e6
        print(
            f"{folder:<18} {len(rows):>5} {count['downloaded']:>10} {count['copied']:>6} {count['present']:>7} {mb:>8.2f}",
            file=out,
        )
    print(f"{len(done)} files in {root}; {len(failed)} failed; provenance in {root / PROVENANCE_FILE}", file=out)
    if not failed:
        print(f"use it with: QEVAL_DATA_DIR={root} (add QEVAL_OFFLINE=1 on a machine without internet)", file=out)


def select(suites: Sequence[str], patterns: Sequence[str], everything: bool) -> list[str]:
    """The table files named by suites, ``--file`` patterns (paths or globs) and ``--all``."""
    chosen: list[str] = []
    if everything:
        chosen += sorted(SOURCES)
    for pattern in patterns:
        hits = [rel for rel in sorted(SOURCES) if rel == pattern or fnmatch.fnmatchcase(rel, pattern)]
        if not hits:
            raise SystemExit(f"qeval-data: --file {pattern!r} matches no file of the source table (qeval-data sources)")
        chosen += hits
    if suites or not (patterns or everything):
        for suite in suites or [DEFAULT_SUITE]:
            for rels in suite_files(suite).values():
                chosen += rels
    return list(dict.fromkeys(chosen))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qeval-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the data files of suites into a folder (QEVAL_DATA_DIR layout)")
    f.add_argument(
        "--suite",
        action="append",
        default=[],
        help=f"suite whose tasks' files to fetch (default {DEFAULT_SUITE}); repeatable",
    )
    f.add_argument(
        "--file", action="append", default=[], help="a relative path or glob of the source table; repeatable"
    )
    f.add_argument("--all", action="store_true", help="every file of the source table")
    f.add_argument(
        "--dir",
        default=os.environ.get("QEVAL_DATA_DIR") or "qeval-data",
        help="target folder (default $QEVAL_DATA_DIR, else ./qeval-data)",
    )
    s = sub.add_parser("sources", help="print the source table")
    s.add_argument("pattern", nargs="?", default="*", help="only paths matching this glob")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "sources":
        for rel in sorted(SOURCES):
            if fnmatch.fnmatchcase(rel, args.pattern):
                src = SOURCES[rel]
                print(f"{rel}\t{src.describe}\t{src.revision or 'unpinned'}\t{src.sha256}")
        return 0
    files = select(args.suite, args.file, args.all)
    try:
        fetch(files, Path(args.dir).expanduser().resolve())
    except DataNotFoundError as err:
        print(f"qeval-data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
