"""Recommendations and a plain-language summary, generated from the numbers.

A user runs a sweep to decide: *which configuration can I afford?*  For each model and
task family the recommendation is the configuration with the least memory that keeps at
least ``keep`` (default 98 %) of the unquantized score, with the evidence.  Memory is
ordered by weight bits per parameter (group scales included), then KV-cache bits, then
activation bits: the order in which they shrink a deployed model.  A leaf of
:mod:`qeval.report`: frames in, frames and sentences out.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from qeval.report.frames import CELL_KEYS, TT_ORDER, bit_width, weight_bits_per_param

DEFAULT_KEEP = 0.98


def memory_key(bits: str) -> tuple[float, float, float]:
    """(weight bits per parameter, KV bits, activation bits): smaller is less memory."""
    kv = re.search(r"KV(\d+)", bits)
    act = re.search(r"A(\d+)", bits)
    return (weight_bits_per_param(bits), float(kv.group(1)) if kv else 16.0, float(act.group(1)) if act else 16.0)


def _noise_note(long: pd.DataFrame | None, key: tuple, family: str) -> str:
    """How much to trust a choice: the family's smallest sample count and its significant losses."""
    if long is None:
        return ""
    rows = long[long.primary & (long.family == family)]
    rows = rows[(rows[CELL_KEYS] == pd.Series(dict(zip(CELL_KEYS, key)))).all(axis=1)]
    if rows.empty:
        return ""
    n = pd.to_numeric(rows["samples"], errors="coerce").min()
    worse = rows[
        rows["significant"].eq(True)  # a nullable column: NaN is not significant
        & ((rows["value"] < rows["fp_value"]) == rows["higher_is_better"].astype(bool))
    ]
    note = f"; smallest sample count {n:g}" if pd.notna(n) else ""
    note += (
        f"; significantly worse on {', '.join(worse.task)}"
        if not worse.empty
        else "; no task significantly worse than unquantized"
    )
    return note


def recommendations(
    families: pd.DataFrame, keep: float = DEFAULT_KEEP, long: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per model and family: the least-memory configuration retaining >= ``keep``, with the
    evidence (how many configurations qualify, the smallest sample count behind the choice,
    and any task where it is significantly worse than unquantized) when ``long`` is given."""
    rows = []
    for model, part in families.groupby(level="model"):
        for family in part.columns:
            scores = part[family].dropna()
            quantized = scores[[k[1] != "FP" for k in scores.index]]
            ok = quantized[quantized >= keep]
            if ok.empty:
                rows.append(
                    {
                        "model": model,
                        "family": family,
                        "recommended": "unquantized",
                        "retained": 1.0,
                        "memory_key": "16-bit",
                        "evidence": f"no configuration keeps {keep:.0%} (best: "
                        f"{_name(quantized.idxmax())} at {quantized.max():.3f})"
                        if not quantized.empty
                        else "no quantized configuration in the sweep",
                    }
                )
                continue
            best = min(ok.index, key=lambda k: (memory_key(k[2]), -ok[k]))
            w, kv, a = memory_key(best[2])
            rows.append(
                {
                    "model": model,
                    "family": family,
                    "recommended": _name(best),
                    "retained": ok[best],
                    "memory_key": f"W {w:g} bits/param, KV {kv:g}, A {a:g}",
                    "evidence": f"{len(ok)} of {len(quantized)} quantized configurations keep {keep:.0%}"
                    + _noise_note(long, best, family),
                }
            )
    return pd.DataFrame(rows)


def _name(key: tuple) -> str:
    model, tensor_type, bits, quant, method, backend = key
    return f"{quant} ({bits}, {method}{'' if backend == 'hf' else ', ' + backend})"


def summary(families: pd.DataFrame, keep: float = DEFAULT_KEEP) -> list[str]:
    """Findings in plain language: how low each tensor type goes, which type is most
    sensitive, which family suffers most, and where a method beats RTN."""
    lines = []
    overall = families.mean(axis=1).rename("retained").reset_index()
    overall = overall[overall.tensor_type != "FP"]
    if overall.empty:
        return ["The sweep has no quantized configuration."]
    overall["width"] = [bit_width(t, b) for t, b in zip(overall.tensor_type, overall.bits)]
    lowest = {}
    for tt, part in sorted(overall.groupby("tensor_type"), key=lambda kv: TT_ORDER.get(kv[0], 9)):
        ok = part[part.retained >= keep]
        tested = ", ".join(f"{w:g}" for w in sorted(part.width.unique(), reverse=True))
        if ok.empty:
            lines.append(
                f"{tt}: no tested setting ({tested} bits) keeps {keep:.0%} of the unquantized quality "
                f"(best {part.retained.max():.3f})."
            )
            lowest[tt] = math.inf
        else:
            low = ok.width.min()
            lowest[tt] = low
            lines.append(f"{tt}: keeps {keep:.0%} of the unquantized quality down to {low:g} bits (tested {tested}).")
    if len(lowest) > 1:
        need = max(lowest.values())
        worst = [t for t in lowest if lowest[t] == need]
        if len(worst) < len(lowest):
            lines.append(
                f"Most sensitive tensor type{'s' if len(worst) > 1 else ''}: {' and '.join(worst)} "
                f"({'no tested setting keeps' if math.isinf(need) else f'needs {need:g} bits to keep'} "
                f"{keep:.0%})."
            )
    quantized = families[[k[1] != "FP" for k in families.index]]
    if quantized.shape[1] > 1:
        means = quantized.mean(axis=0).sort_values()
        lines.append(
            f"Family that loses most on average over quantized configurations: {means.index[0]} "
            f"({means.iloc[0]:.3f} retained; least: {means.index[-1]} at {means.iloc[-1]:.3f})."
        )
    by_setting = overall.groupby(["model", "tensor_type", "bits", "quant", "backend"])
    for (_model, _tt, bits, quant, backend), part in by_setting:
        if part.method.nunique() < 2 or "rtn" not in set(part.method):
            continue
        rtn = part[part.method == "rtn"].retained.iloc[0]
        best = part.loc[part.retained.idxmax()]
        where = f"At {quant} ({bits}{'' if backend == 'hf' else ', ' + backend})"
        if best.method != "rtn":
            lines.append(
                f"{where} {best.method} retains {best.retained:.3f} against RTN's {rtn:.3f} "
                f"({best.retained - rtn:+.3f})."
            )
        else:
            lines.append(f"{where} no method beats RTN ({rtn:.3f}).")
    return lines
