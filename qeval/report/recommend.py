"""Recommendations and a plain-language summary, generated from the paired verdicts.

A user runs a sweep to decide: *which configuration can I afford?*  For each model and
task family the recommendation is the configuration with the least memory whose paired
verdict (:mod:`qeval.report.verdicts`) is *within* tolerance: the interval of its retained
quality lies above ``keep`` (default 98 %) on every task of the family.  A ratio of two
noisy scores is never a finding; every sentence cites its test, adjusted p-value and n.  Memory is
ordered by weight bits per parameter (group scales included), then KV-cache bits, then
activation bits: the order in which they shrink a deployed model.  A leaf of
:mod:`qeval.report`: frames in, frames and sentences out.
"""

from __future__ import annotations

import re

import pandas as pd

from qeval.eval.registry import FAMILIES
from qeval.report.frames import CELL_KEYS, TT_ORDER, bit_width, weight_bits_per_param
from qeval.report.verdicts import evidence

DEFAULT_KEEP = 0.98


def memory_key(bits: str) -> tuple[float, float, float]:
    """(weight bits per parameter, KV bits, activation bits): smaller is less memory."""
    kv = re.search(r"KV(\d+)", bits)
    act = re.search(r"A(\d+)", bits)
    return (weight_bits_per_param(bits), float(kv.group(1)) if kv else 16.0, float(act.group(1)) if act else 16.0)


def recommendations(
    verdicts: pd.DataFrame, paired: pd.DataFrame, keep: float = DEFAULT_KEEP, constant: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per model and family: the least-memory configuration whose family verdict is *within*
    tolerance (every task's interval of retained quality above ``keep``, paired with the
    unquantized cell), with the evidence.  Where none is, the unquantized model, and the
    evidence says how many configurations lost significantly and how many were inconclusive
    (with the items a decision would need).  ``constant``
    (:func:`qeval.report.frames.constant_answer_frame`) adds a caution to a recommendation
    resting on an entry the unquantized model answers constantly: there *within* only says
    the quantized model is no less uninformative."""
    rows = []
    caution = _constant_at_fp(constant)
    if verdicts.empty:
        return pd.DataFrame(columns=["model", "family", "recommended", "retained", "memory_key", "evidence"])
    for model, part in verdicts.groupby(level="model"):
        for family in part.columns:
            column = part[family].dropna()
            within = [k for k in column.index if column[k] == "within"]
            tasks = paired[(paired.model == model) & (paired.family == family)]
            if not within:
                losses = [k for k in column.index if column[k] == "loss"]
                unsure = [k for k in column.index if column[k] == "inconclusive"]
                note = f"no configuration is confidently within {keep:.0%}: {len(losses)} significant loss(es)"
                note += f", {len(unsure)} inconclusive"
                need = tasks[tasks.verdict == "inconclusive"]["n_needed"].dropna()
                if not need.empty:
                    note += f" (up to ~{int(need.max())} items per task needed to decide)"
                rows.append(
                    {
                        "model": model,
                        "family": family,
                        "recommended": "unquantized",
                        "retained": 1.0,
                        "memory_key": "16-bit",
                        "evidence": note,
                    }
                )
                continue
            best = min(within, key=memory_key_of)
            w, kv, a = memory_key(best[2])
            mine = tasks[(tasks[CELL_KEYS] == pd.Series(dict(zip(CELL_KEYS, best)))).all(axis=1)]
            rows.append(
                {
                    "model": model,
                    "family": family,
                    "recommended": _name(best),
                    "retained": float(mine["retained"].min()) if not mine.empty else float("nan"),
                    "memory_key": f"W {w:g} bits/param, KV {kv:g}, A {a:g}",
                    "evidence": f"{len(within)} of {len(column)} quantized configurations within {keep:.0%}; "
                    + "; ".join(evidence(r) for r in mine.itertuples())
                    + "".join(caution[(model, t)] for t in sorted(set(mine.task)) if (model, t) in caution),
                }
            )
    return pd.DataFrame(rows)


def _constant_at_fp(constant: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """(model, suite entry) -> the caution for an entry whose unquantized cell answers it (or
    one of its members) with one choice; entries as the paired frame names them (no shots)."""
    if constant is None or constant.empty:
        return {}
    flat = constant.reset_index()
    flat = flat[flat.tensor_type == "FP"]
    out: dict[tuple[str, str], str] = {}
    for (model, label), part in flat.groupby(["model", "task"], sort=False):
        entry = str(label).split("@", 1)[0]
        where = ", ".join(f"{r.subtask or entry} {r.share:.0%} of {r.n}" for r in part.itertuples())
        out[(str(model), entry)] = (
            f"; caution: the unquantized model gives one answer to nearly every item of {where}, so {entry}'s "
            "score is a base rate there and this verdict does not show the ability kept"
        )
    return out


def memory_key_of(key: tuple) -> tuple[float, float, float]:
    return memory_key(key[2])


def _name(key: tuple) -> str:
    model, tensor_type, bits, quant, method, backend = key
    return f"{quant} ({bits}, {method}{'' if backend == 'hf' else ', ' + backend})"


def summary(
    verdicts: pd.DataFrame, paired: pd.DataFrame, keep: float = DEFAULT_KEEP, divergence: pd.DataFrame | None = None
) -> list[str]:
    """Findings in plain language, each backed by a paired test against the unquantized cell:
    how low each tensor type goes while every family stays within tolerance, each significant
    loss with its evidence, what stays inconclusive, and the distribution-level damage
    (KL divergence, top-1 agreement) that needs no labels."""
    if verdicts.empty:
        return [
            "No paired verdicts: no quantized cell has an unquantized cell of the same model, suite and "
            "backend with per-item outcomes (records written before qeval 0.3 keep none: rerun the sweep with rerun=true)."
        ]
    alpha, correction = paired.attrs.get("alpha", 0.05), paired.attrs.get("correction", "bh")
    lines = []
    cells = verdicts.reset_index()
    cells["width"] = [bit_width(t, b) for t, b in zip(cells.tensor_type, cells.bits)]
    families = [c for c in verdicts.columns]
    missing = [f for f in FAMILIES if f not in families]
    # "every family" only when every family was measured; else name the ones that were
    scope = "every family" if not missing else ("basic NLP" if families == ["basic_nlp"] else ", ".join(families))
    cells["all_within"] = [all(v == "within" for v in row if isinstance(v, str)) for row in cells[families].values]
    for tt, part in sorted(cells.groupby("tensor_type"), key=lambda kv: TT_ORDER.get(kv[0], 9)):
        tested = ", ".join(f"{w:g}" for w in sorted(part.width.unique(), reverse=True))
        ok = part[part.all_within]
        if ok.empty:
            lines.append(f"{tt}: no tested setting ({tested} bits) is confidently within {keep:.0%} in {scope}.")
        else:
            lines.append(
                f"{tt}: within {keep:.0%} in {scope} down to {ok.width.min():g} bits (tested {tested}; "
                f"{', '.join(sorted(set(ok.quant)))})."
            )
    losses = paired[paired.verdict == "loss"]
    for (quant, method, backend, family), part in losses.groupby(["quant", "method", "backend", "family"]):
        where = f"{quant} ({method}{'' if backend == 'hf' else ', ' + backend})"
        lines.append(f"Loss: {where} in {family}: " + "; ".join(evidence(r) for r in part.itertuples()) + ".")
    unsure = paired[paired.verdict == "inconclusive"]
    if not unsure.empty:
        by_task = unsure.groupby("task")["quant"].apply(lambda q: ", ".join(sorted(set(q))))
        lines.append(
            "Inconclusive (neither within tolerance nor a significant loss at these sample sizes): "
            + "; ".join(f"{task} for {quants}" for task, quants in by_task.items())
            + "."
        )
    if missing:
        lines.append(
            f"Not measured here: {', '.join(missing)} (no task of theirs in this sweep's suite; "
            f"{'suite=' + missing[0] if len(missing) == 1 else 'suite=' + ', suite='.join(missing)} or suite=qllm_eval measure them)."
        )
    if divergence is not None and not divergence.empty:
        parts = []
        for r in divergence.itertuples():
            text = f"{r.quant} {r.kld:.3g}"
            if pd.notna(r.kld_stderr):
                text += f" ± {r.kld_stderr:.1g}"
            if pd.notna(r.top1_agree):
                text += f" (top-1 {r.top1_agree:.1%})"
            parts.append(text)
        lines.append(
            "KL divergence from the unquantized model per token on the perplexity corpus (mean ± SE): "
            + "; ".join(parts)
            + "."
        )
    lines.append(
        f"Tests are paired on the same items (exact McNemar for right/wrong outcomes, sign test otherwise, "
        f"z over tokens for perplexity); p-values adjusted over the {len(paired)} comparisons of this report "
        f"({'Benjamini-Hochberg' if correction == 'bh' else correction}), alpha {alpha:g}."
    )
    return lines


def constant_answer_findings(constant: pd.DataFrame) -> list[str]:
    """Sentences for :func:`qeval.report.frames.constant_answer_frame`: where the unquantized
    model gives one answer to (nearly) every item, its score there is a base rate and the
    verdicts on that entry do not measure the ability; where only a quantized cell does, the
    quantization collapsed the model's answers."""
    if constant.empty:
        return []
    flat = constant.reset_index()
    flat["where"] = [f"{t}/{s}" if s else t for t, s in zip(flat.task, flat.subtask)]
    lines = []
    for model, part in flat.groupby("model", sort=False):
        fp = part[part.tensor_type == "FP"]
        if not fp.empty:
            spread = ", ".join(f"{r.where} ({r.share:.0%} of {r.n} items)" for r in fp.itertuples())
            lines.append(
                f"{model} unquantized gives the same answer to nearly every item of {spread}: its score there is "
                "that answer's base rate, so a verdict on these entries says the quantized model is no less "
                "uninformative, not that the ability is kept."
            )
        fp_where = set(fp["where"])
        collapsed = part[(part.tensor_type != "FP") & ~part["where"].isin(fp_where)]
        for (quant, method), cells in collapsed.groupby(["quant", "method"], sort=False):
            spread = ", ".join(f"{r.where} ({r.share:.0%} of {r.n} items)" for r in cells.itertuples())
            lines.append(
                f"{model} {quant} ({method}) collapsed to one answer on {spread}, where the unquantized "
                "model's answers vary."
            )
    return lines
