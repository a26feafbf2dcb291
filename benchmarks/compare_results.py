"""Compare two result folders metric by metric: are the numbers of the same cells identical?

Cells are paired by hash (the identity of their config), and optionally by label where a
method was renamed (``--rename quarot_gptq=quarot+gptq``).  Used to check that a refactoring
changed no number: run the same sweep on both versions into two folders, then

    python benchmarks/compare_results.py results_old/cmp results_new/cmp --rename quarot_gptq=quarot+gptq

It prints one row per paired cell (metrics compared, how many differ, the largest relative
difference) and exits 1 if any metric differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if "hash" in record:
            out[record["hash"]] = record
    return out


def _numbers(record: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {
        (task, key): float(value)
        for task, metrics in (record.get("metrics") or {}).items()
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _key(record: dict[str, Any], renames: dict[str, str]) -> tuple[str, str, str]:
    cell = record["cell"]
    return cell["model"], cell["quant"], renames.get(cell["method"], cell["method"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rename", action="append", default=[], help="old=new method label in a")
    args = parser.parse_args(argv)
    renames = dict(r.split("=", 1) for r in args.rename)
    a, b = _records(args.a), _records(args.b)
    pairs = [(a[h], b[h], "hash") for h in sorted(set(a) & set(b))]
    by_label_b = {_key(r, {}): r for h, r in b.items() if h not in a}
    for h, r in sorted(a.items()):
        if h not in b and (match := by_label_b.get(_key(r, renames))) is not None:
            pairs.append((r, match, "label"))
    print("| cell (a) | paired by | status | metrics | differing | max rel. diff |")
    print("|---|---|---|---|---|---|")
    total = differing = 0
    for ra, rb, how in pairs:
        na, nb = _numbers(ra), _numbers(rb)
        keys = sorted(set(na) | set(nb))
        diff = [
            k for k in keys if na.get(k) != nb.get(k) and not (math.isnan(na.get(k, 0)) and math.isnan(nb.get(k, 0)))
        ]
        rel = max((abs(na[k] - nb[k]) / max(abs(na[k]), 1e-30) for k in diff if k in na and k in nb), default=0.0)
        status = (
            ra.get("status") if ra.get("status") == rb.get("status") else f"{ra.get('status')} / {rb.get('status')}"
        )
        print(f"| {ra['label']} | {how} | {status} | {len(keys)} | {len(diff)} | {rel:.3g} |")
        total += len(keys)
        differing += len(diff) + (ra.get("status") != rb.get("status"))
    unpaired = [r["label"] for h, r in a.items() if all(h != pa["hash"] for pa, _pb, _ in pairs)]
    print(
        f"\n{len(pairs)} cells paired, {total} metrics compared, {differing} differ; unpaired in a: {unpaired or 'none'}"
    )
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
