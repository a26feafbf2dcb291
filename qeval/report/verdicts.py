"""Verdicts: every quantized cell against the unquantized cell of the same model, item by item.

A leaf of :mod:`qeval.report` that reads only the records and their per-item files
(:mod:`qeval.eval.items`), so an old sweep can be re-judged with another tolerance, test
correction or alpha without rerunning a cell.  For each (quantized cell, task) it pairs the
task's per-item outcomes with the FP cell's (same model, suite and backend), and computes
with :mod:`qeval.stats.paired`:

* retained quality with a 95 % interval (Agresti–Min for binary outcomes, so that no flips
  in four items is not certainty), the paired test of *no difference* (exact McNemar for
  binary outcomes, the exact sign test otherwise; a token-level z-test for perplexity, see
  below) and the one-sided test of *retained >= keep*;
* flips for binary outcomes (right -> wrong, wrong -> right, share of items changed);
* both p-values adjusted over every row of the report (Benjamini–Hochberg by default:
  the report makes many claims at once, and a false-discovery rate keeps the share of wrong
  "loss" claims bounded without making a 100-row report blind; ``holm`` controls the
  family-wise error instead);
* the three-way verdict (:func:`qeval.stats.paired.verdict`): **within** tolerance (the
  interval lies above ``keep``), **loss** (significantly below it and significantly
  different, after correction) or **inconclusive**, with the items needed to decide.

Perplexity is paired token by token: each window's record carries the sums of the per-token
NLL differences against the cached FP reference (qeval.eval.divergence), so ln(PPL_q/PPL_FP)
has a standard error over tokens, which treats tokens as independent (llama.cpp's
convention for its KL statistics; neighbouring tokens are correlated, so this SE is
optimistic).  Without those sums (older records, backends without logits) the windows'
mean NLLs are paired, with the sign test, which with two windows can never be significant.

A family's verdict is **loss** if any of its tasks is a loss, **within** if all are within,
**inconclusive** otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from qeval.eval.registry import FAMILIES
from qeval.report.frames import CELL_KEYS
from qeval.results import record_items
from qeval.stats.paired import (
    Retained,
    adjust,
    align,
    flips,
    mean_stderr_from_sums,
    retained,
    retained_from_log_mean,
    verdict,
)

GROUP_KEYS = ["model", "suite", "backend"]  # a cell is compared with the FP cell of its group
DEFAULT_KEEP, DEFAULT_ALPHA, DEFAULT_CORRECTION = 0.98, 0.05, "bh"

# per-window sums a perplexity item row carries for the token-level paired test
TOKEN_SUMS = ("tokens", "dnll_sum", "dnll_sq_sum")


def _outcome(info: Mapping[str, Any]) -> str:
    """The per-item column the paired test reads: a native task's declared outcome, else the
    primary metric (lm-eval's per-sample metric of that name)."""
    return str(info.get("item_outcome") or info.get("primary_metric") or "")


def _is_rate(values: np.ndarray) -> bool:
    return bool(values.size) and bool(np.all((values >= 0.0) & (values <= 1.0)))


def _token_level(table: Mapping[str, list]) -> tuple[int, float, float] | None:
    """(tokens, mean, se) of the per-token NLL difference q - FP from a quantized cell's
    per-window sums, or None when the rows do not carry them."""
    if not all(col in table for col in TOKEN_SUMS):
        return None
    try:
        n = int(sum(table["tokens"]))
        mean, se = mean_stderr_from_sums(float(sum(table["dnll_sum"])), float(sum(table["dnll_sq_sum"])), n)
    except (TypeError, ValueError):
        return None
    return None if n < 2 else (n, mean, se)


# lm-eval keeps a document-perplexity metric per document as (log-likelihood, count) -- words or
# bytes -- and aggregates the sums; a document's own value follows from its pair
_PAIR_METRICS = {
    "word_perplexity": lambda ll, n: math.exp(-ll / n),
    "byte_perplexity": lambda ll, n: math.exp(-ll / n),
    "bits_per_byte": lambda ll, n: -ll / (n * math.log(2)),
}


def _document_values(table: Mapping[str, list], column: str) -> Mapping[str, list]:
    """``table`` with ``column``'s (log-likelihood, count) pairs -- tuples, or their text as a
    record stores them -- replaced by each document's own metric; unchanged otherwise."""
    to_value = _PAIR_METRICS.get(column)
    values = table.get(column)
    if to_value is None or not values:
        return table
    converted = []
    for v in values:
        pair = v
        if isinstance(v, str) and v.startswith("("):
            try:
                pair = tuple(float(x) for x in v.strip("()").split(","))
            except ValueError:
                return table
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and pair[1]):
            return table
        converted.append(to_value(float(pair[0]), float(pair[1])))
    return {**table, column: converted}


def compare_task(
    fp_table: Mapping[str, list] | None, q_table: Mapping[str, list] | None, info: Mapping[str, Any]
) -> dict[str, Any]:
    """One task of one quantized cell against FP: retained with interval, the paired test,
    flips; ``test`` says which, or why none could be made."""
    if not q_table or not fp_table:
        return {"test": "no per-item outcomes"}
    if info.get("kind") == "perplexity":
        token = _token_level(q_table)
        if token is not None:
            n, mean, se = token
            return {"ret": retained_from_log_mean(n, mean, se), "test": "z (tokens)", "unit": "tokens"}
        paired = align(fp_table, q_table, "nll")
        return {
            "ret": retained(paired.fp, paired.q, higher_is_better=False, log_scale=True),
            "test": "sign (windows)",
            "unit": "windows",
        }
    column = _outcome(info)
    if column not in fp_table or column not in q_table:
        return {"test": f"no per-item {column!r}"}
    fp_table, q_table = _document_values(fp_table, column), _document_values(q_table, column)
    try:
        paired = align(fp_table, q_table, column)
    except ValueError as err:  # e.g. a metric lm-eval keeps per item as a tuple
        return {"test": f"per-item {column!r} not comparable ({err})"}
    fp, q = paired.fp, paired.q
    higher = bool(info.get("item_higher_is_better", info.get("higher_is_better", True)))
    out: dict[str, Any] = {"unit": "items"}
    binary = bool(fp.size) and bool(np.all(np.isin(fp, (0.0, 1.0)) & np.isin(q, (0.0, 1.0))))
    if not higher and _is_rate(np.concatenate([fp, q])):
        fp, q, higher = 1.0 - fp, 1.0 - q, True  # a rate where lower is better: its complement
        out["note"] = f"compared as 1 - {column}"
    if higher:
        out["ret"] = retained(fp, q, higher_is_better=True, binary=binary)
    elif np.all(fp > 0) and np.all(q > 0):
        out["ret"] = retained(np.log(fp), np.log(q), higher_is_better=False, log_scale=True)
        out["note"] = f"geometric mean of {column}"
    else:
        return {"test": f"per-item {column!r} lower-is-better and not positive"}
    out["test"] = "McNemar exact" if binary else "sign"
    if binary:
        table = flips(fp, q)
        out.update(
            right_to_wrong=table.right_to_wrong, wrong_to_right=table.wrong_to_right, changed=table.share_changed
        )
    return out


def paired_frame(
    records: Iterable[dict],
    keep: float = DEFAULT_KEEP,
    alpha: float = DEFAULT_ALPHA,
    correction: str = DEFAULT_CORRECTION,
) -> pd.DataFrame:
    """One row per (quantized cell, task): retained quality with its interval, the tests
    (raw and adjusted over all rows), flips and the verdict.  Empty when no group has an
    unquantized cell."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("kind") != "efficiency"]
    groups: dict[tuple, list[dict]] = {}
    for rec in ok:
        cell = rec["cell"]
        groups.setdefault(tuple(cell.get(k) for k in GROUP_KEYS), []).append(rec)
    rows = []
    for cells in groups.values():
        fps = [r for r in cells if r["cell"].get("tensor_type") == "FP"]
        if not fps:
            continue
        fp = fps[0]
        fp_items = record_items(fp) or {}
        for rec in cells:
            if rec is fp or rec["cell"].get("tensor_type") == "FP":
                continue
            q_items = record_items(rec) or {}
            for entry, info in (rec.get("tasks") or {}).items():
                if entry not in (fp.get("metrics") or {}):
                    continue
                result = compare_task(fp_items.get(entry), q_items.get(entry), info)
                ret: Retained | None = result.pop("ret", None)
                rows.append(
                    {
                        **{k: rec["cell"].get(k) for k in CELL_KEYS},
                        "suite": rec["cell"].get("suite"),
                        "task": entry,
                        "family": info.get("family", "basic_nlp"),
                        "n": ret.n if ret else 0,
                        "retained": ret.value if ret else math.nan,
                        "low": ret.low if ret else math.nan,
                        "high": ret.high if ret else math.nan,
                        "p_diff": ret.p_diff if ret else math.nan,
                        "p_below": ret.p_below(keep) if ret else math.nan,
                        "_ret": ret,
                        **result,
                    }
                )
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    frame["p_diff_adj"] = adjust(frame["p_diff"].tolist(), correction)
    frame["p_below_adj"] = adjust(frame["p_below"].tolist(), correction)
    verdicts, needed = [], []
    for ret, p_below_adj, p_diff_adj in zip(frame["_ret"], frame["p_below_adj"], frame["p_diff_adj"]):
        if ret is None or not math.isfinite(ret.value):
            verdicts.append("inconclusive")
            needed.append(None)
            continue
        v = verdict(ret, keep, p_below_adj, p_diff_adj, alpha)
        verdicts.append(v.verdict)
        needed.append(v.n_needed)
    frame["verdict"] = verdicts
    frame["n_needed"] = pd.array(needed, dtype="Int64")
    frame.attrs.update(keep=keep, alpha=alpha, correction=correction)
    return frame.drop(columns="_ret")


def family_verdicts(paired: pd.DataFrame) -> pd.DataFrame:
    """One row per quantized cell, one column per family: loss if any task of the family is a
    loss, within if all are within, inconclusive otherwise."""
    if paired.empty:
        return pd.DataFrame()

    def combine(values: pd.Series) -> str:
        kinds = set(values)
        if "loss" in kinds:
            return "loss"
        return "within" if kinds == {"within"} else "inconclusive"

    table = paired.pivot_table(index=CELL_KEYS, columns="family", values="verdict", aggfunc=combine)
    return table[[f for f in FAMILIES if f in table.columns] + [f for f in table.columns if f not in FAMILIES]]


def evidence(row: Any) -> str:
    """The claim's evidence in words: retained with interval, test, adjusted p, n, flips."""
    if not math.isfinite(row.retained):
        return f"{row.task}: {row.test}"
    text = f"{row.task}: retained {row.retained:.3f} [{row.low:.3f}, {row.high:.3f}], {row.test}"
    text += f" p_adj={row.p_diff_adj:.2g}, n={row.n} {getattr(row, 'unit', 'items')}"
    rw, wr = getattr(row, "right_to_wrong", math.nan), getattr(row, "wrong_to_right", math.nan)
    if isinstance(rw, (int, float)) and math.isfinite(rw):
        text += f", flips {int(rw)} right->wrong / {int(wr)} wrong->right"
    if row.verdict == "inconclusive" and pd.notna(row.n_needed):
        text += f"; ~{int(row.n_needed)} items needed to decide"
    return text


DIVERGENCE_METRICS = (
    "kld",
    "kld_stderr",
    "kld_p99",
    "kld_max",
    "top1_agree",
    "top1_agree_stderr",
    "dp_rms",
    "ln_ppl_ratio",
    "ln_ppl_ratio_stderr",
)


def divergence_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Distribution-level damage per quantized cell and perplexity corpus: KL divergence from
    the unquantized model, top-1 agreement, Δp, ln(PPL ratio) (qeval.eval.divergence).
    These need no labels; empty when no record has them (e.g. vLLM cells)."""
    rows = []
    for rec in records:
        if rec.get("status") != "ok" or rec.get("kind") == "efficiency":
            continue
        cell = rec["cell"]
        if cell.get("tensor_type") == "FP":
            continue
        for entry, metrics in (rec.get("metrics") or {}).items():
            if "kld" not in metrics:
                continue
            row = {**{k: cell.get(k) for k in CELL_KEYS}, "suite": cell.get("suite"), "task": entry}
            row.update({m: metrics.get(m, math.nan) for m in DIVERGENCE_METRICS})
            row["tokens"] = metrics.get("tokens")
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values(["model", "task", "kld"]).reset_index(drop=True)


def mark_significant(long: pd.DataFrame, paired: pd.DataFrame, alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """``long`` with ``significant`` from the paired test (adjusted p < alpha) on each
    quantized cell's primary metric; missing elsewhere (no paired test, or the FP cell)."""
    out = long.copy()
    out["significant"] = pd.Series([pd.NA] * len(out), index=out.index, dtype="boolean")
    if paired.empty:
        return out
    keys = [*CELL_KEYS, "suite", "task"]
    sig = {tuple(r[k] for k in keys): bool(r["p_diff_adj"] < alpha) for _, r in paired.iterrows()
           if pd.notna(r["p_diff_adj"])}  # fmt: skip
    primary = out["primary"].astype(bool)
    for idx in out.index[primary]:
        key = tuple(out.at[idx, k] for k in keys)
        if key in sig:
            out.at[idx, "significant"] = sig[key]
    return out
