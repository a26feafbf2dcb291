"""Tables from the result store (pandas does the pivoting).

``long_frame`` flattens records into one row per (cell, task, metric);
``cell_table`` pivots that into one row per cell and one column per metric,
and adds each metric divided by the same model's unquantized (FP) value
(``<metric> /FP``): above 1 means larger than unquantized, which is worse for
perplexity and better for accuracy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from qeval.results import iter_records

# a row is a cell: the preset name (quant) separates specs with the same bits label
# (w8a8, w8a8-static, w8a8-fp8 are all W8A8)
CELL_KEYS = ["model", "tensor_type", "bits", "quant", "method"]
_TT_ORDER = {"FP": 0, "W": 1, "WA": 2, "KV": 3, "W+KV": 4, "WA+KV": 5}
_HIDDEN = {"samples", "sample_len", "windows", "tokens", "nll", "decode_chunk"}


def long_frame(dirs: Iterable[str | Path]) -> pd.DataFrame:
    rows = []
    for d in dirs:
        for rec in iter_records(d):
            if rec.get("status") != "ok":
                continue
            cell = rec["cell"]
            for task, metrics in rec["metrics"].items():
                for metric, value in metrics.items():
                    if metric.endswith("_stderr") or metric in _HIDDEN:
                        continue
                    rows.append({**{k: cell[k] for k in CELL_KEYS},
                                 "suite": cell["suite"], "backend": cell["backend"], "sweep": rec["sweep"],
                                 "task": task, "metric": f"{task}.{metric}", "value": value,
                                 "stderr": metrics.get(f"{metric}_stderr"),
                                 "samples": metrics.get("samples", metrics.get("windows"))})
    if not rows:
        raise ValueError(f"no finished cells under {', '.join(map(str, dirs))}")
    return pd.DataFrame(rows)


def add_normalized(long: pd.DataFrame) -> pd.DataFrame:
    """Add ``normalized`` = value / the same model's FP value for that metric."""
    group = ["model", "suite", "backend", "metric"]
    base = long[long.tensor_type == "FP"].groupby(group)["value"].first().rename("fp_value")
    out = long.join(base, on=group)
    out["normalized"] = out["value"] / out["fp_value"]
    return out


def cell_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, one column per metric and per normalized metric."""
    long = add_normalized(long)
    values = long.pivot_table(index=CELL_KEYS, columns="metric", values="value", aggfunc="first")
    norm = long.pivot_table(index=CELL_KEYS, columns="metric", values="normalized", aggfunc="first")
    norm.columns = [f"{c} /FP" for c in norm.columns]
    table = values.join(norm)
    table = table[[c for m in values.columns for c in (m, f"{m} /FP") if c in table.columns]]
    order = sorted(table.index, key=lambda k: (k[0], _TT_ORDER.get(k[1], 9), _bits_key(k[2]), k[3], k[4]))
    return table.loc[order]


def _bits_key(label: str) -> tuple:
    digits = [int(s) for s in re.findall(r"\d+", label)]
    return tuple(-d for d in digits)


def write_tables(results_dir: str | Path, out_dir: str | Path | None = None) -> tuple[str, list[Path]]:
    """Write CSV (raw long + cell table) and Markdown; return the Markdown and the files."""
    results_dir = Path(results_dir)
    long = add_normalized(long_frame([results_dir]))
    table = cell_table(long.drop(columns=["fp_value", "normalized"]))
    out = Path(out_dir) if out_dir else Path("plots") / results_dir.name
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "scores_long.csv", out / "table.csv", out / "table.md"]
    long.to_csv(files[0], index=False)
    table.to_csv(files[1])
    markdown = table.reset_index().to_markdown(index=False, floatfmt=".4g")
    files[2].write_text(markdown + "\n")
    return markdown, files
