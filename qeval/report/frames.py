"""The report's frames: every table computed from the result store (pandas does the pivoting).

A leaf of :mod:`qeval.report`: it computes and returns frames and writes nothing (files are
:mod:`qeval.report.write`'s job), so the figures, recommendations and the HTML page build on
it without depending on each other.

``long_frame`` flattens records into one row per (cell, task, metric);
``cell_table`` pivots that into one row per cell and one column per metric,
and adds each metric divided by the same model's unquantized (FP) value
(``<metric> /FP``): above 1 means larger than unquantized, which is worse for
perplexity and better for accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from qeval.config import FORMAT_SCALE_BITS, label_weight_format
from qeval.eval.registry import FAMILIES
from qeval.results import iter_records, record_items

# a row is a cell: the preset name (quant) separates specs with the same bits label
# (w8a8, w8a8-static, w8a8-fp8 are all W8A8)
CELL_KEYS = ["model", "tensor_type", "bits", "quant", "method", "backend"]
TT_ORDER = {"FP": 0, "W": 1, "WA": 2, "KV": 3, "W+KV": 4, "WA+KV": 5}  # reading order of tensor types
FP_BITS = 16
_HIDDEN = {"samples", "sample_len", "windows", "tokens", "nll", "decode_chunk"}
# divergence from the FP model: already relative to it (the FP cell's is 0), so a ratio to FP says
# nothing; the report shows them in their own table (qeval.report.verdicts.divergence_frame)
_HIDDEN |= {"kld", "kld_p50", "kld_p90", "kld_p99", "kld_p999", "kld_max", "top1_agree", "dp_mean", "dp_rms"}
_HIDDEN |= {"ln_ppl_ratio", "responses"}
# how a generation task's answers ended (qeval.eval.reasoning): shown beside the task's score
RESPONSE_METRICS = (
    "response_tokens",
    "response_tokens_p90",
    "truncated_share",
    "unclosed_think_share",
    "think_share",
    "loop_share",
)


def _entry_info(rec: dict, entry: str, metrics: dict) -> dict:
    """Family, primary metric and direction of one suite entry of a record.

    Records written before tasks declared them (no ``record["tasks"]``) fall back to
    the two tasks those suites had: perplexity (lower is better) and accuracy.
    """
    info = (rec.get("tasks") or {}).get(entry)
    if info:
        return info
    primary = "ppl" if "ppl" in metrics else "acc"
    return {"family": "basic_nlp", "primary_metric": primary, "higher_is_better": primary != "ppl"}


def _entry_label(rec: dict, entry: str) -> str:
    """The entry's name, with its shots when it has any (shots are a sweep axis: MMLU@5shot)."""
    task_cfg = ((rec.get("config") or {}).get("suite") or {}).get("tasks", {}).get(entry) or {}
    shots = task_cfg.get("num_fewshot") if isinstance(task_cfg, dict) else None
    return f"{entry}@{shots}shot" if shots else entry


def read_sweeps(dirs: Iterable[str | Path]) -> list[dict]:
    """Every readable record under the given sweep folders, read once for all the tables."""
    return [rec for d in dirs for rec in iter_records(d)]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unreadable_reason(rec: dict) -> str | None:
    """Why an ok record's scores cannot be read (a suite entry without metrics, a primary metric
    missing, a metric that is not a number), or None.  Such a record is listed, never dropped
    in silence: a table that loses a cell looks like a sweep that never ran it."""
    if rec.get("status") != "ok" or rec.get("kind") == "efficiency":
        return None
    metrics = rec.get("metrics")
    if not isinstance(metrics, dict) or not isinstance(rec.get("cell"), dict):
        return "the record has no metrics mapping"
    for entry in rec.get("tasks") or metrics:
        if not isinstance(metrics.get(entry), dict):
            return f"suite entry {entry!r} has no metrics"
    for entry, values in metrics.items():
        if not isinstance(values, dict):
            return f"the metrics of {entry!r} are {type(values).__name__}, not a mapping"
        primary = ((rec.get("tasks") or {}).get(entry) or {}).get("primary_metric")
        if primary and primary not in values:
            return f"{entry}: its primary metric {primary!r} is missing"
        for metric, value in values.items():
            if metric.endswith("_stderr") or value is None or _is_number(value):
                continue  # lm-eval writes stderr "N/A" where it has none; None: not measurable
            return f"{entry}.{metric} is {value!r}, not a number"
    return None


def long_frame(records: Iterable[dict]) -> pd.DataFrame:
    rows = []
    for rec in records:
        if rec.get("status") != "ok" or rec.get("kind") == "efficiency" or unreadable_reason(rec):
            continue
        cell = rec["cell"]
        for task, metrics in rec["metrics"].items():
            info = _entry_info(rec, task, metrics)
            label = _entry_label(rec, task)
            for metric, value in metrics.items():
                if metric.endswith("_stderr") or metric in _HIDDEN or not _is_number(value):
                    continue
                primary = metric == info["primary_metric"]
                rows.append(
                    {
                        **{k: cell[k] for k in CELL_KEYS},
                        "suite": cell["suite"],
                        "sweep": rec["sweep"],
                        "task": label,
                        "metric": f"{label}.{metric}",
                        "value": value,
                        "stderr": metrics.get(f"{metric}_stderr"),
                        "samples": metrics.get("samples", metrics.get("windows")),
                        "family": info["family"],
                        "primary": primary,
                        "higher_is_better": bool(info["higher_is_better"]) if primary else None,
                    }
                )
    if not rows:
        raise ValueError("no cell with readable scores among the records")
    return pd.DataFrame(rows)


def response_frame(long: pd.DataFrame) -> pd.DataFrame:
    """Generation tasks: per cell and task, the primary score beside the shape of the answers --
    mean and p90 length in tokens, and the shares truncated at the budget, with an unclosed
    reasoning block, with any reasoning block, and looping.  A quantized model that scores
    lower because it thinks longer, loops or never closes its reasoning shows it here.  Empty
    when no generation task recorded them."""
    measure = long["metric"].str.rsplit(".", n=1).str[-1]
    resp = long[measure.isin(RESPONSE_METRICS)].assign(measure=measure)
    if resp.empty:
        return pd.DataFrame()
    keys = [*CELL_KEYS, "task"]
    shape = resp.pivot_table(index=keys, columns="measure", values="value", aggfunc="first")
    shape = shape[[m for m in RESPONSE_METRICS if m in shape.columns]]
    prim = long[long.primary & long.task.isin(set(resp.task))].set_index(keys)
    score = pd.DataFrame(
        {"primary": prim["metric"].str.rsplit(".", n=1).str[-1], "score": prim["value"], "n": prim["samples"]}
    )
    table = score.join(shape, how="outer")
    return _in_cell_order(table)


SUBTASKS_SHOWN = 8  # a group's members are shown one by one up to this many (ETHICS' five, not MMLU's 56)


def _small_group_members(ids: list[str]) -> list[str] | None:
    """Each item's member of its group (item ids ``<subtask>/<doc id>``) when the table is a
    group of at most :data:`SUBTASKS_SHOWN` members; None for a single task or a large group."""
    if not ids or not all("/" in i for i in ids):
        return None
    members = [i.split("/", 1)[0] for i in ids]
    return members if len(set(members)) <= SUBTASKS_SHOWN else None


def subtask_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Groups of a few subtasks (the five ETHICS subsets): per cell, each member's primary
    metric with its standard error and item count, from the per-item table (item ids
    ``<subtask>/<doc id>``).  lm-eval scores every member; a record's metrics keep the group's
    aggregate, so this is where a member that quantization hurt more than the others shows.
    Descriptive: the verdicts test the group.  Empty when no such group was run."""
    rows = []
    for rec in records:
        if rec.get("status") != "ok" or unreadable_reason(rec):
            continue
        for entry, table in (record_items(rec) or {}).items():
            ids = [str(i) for i in table.get("id") or []]
            info = _entry_info(rec, entry, (rec.get("metrics") or {}).get(entry, {}))
            values = table.get(info["primary_metric"])
            members = _small_group_members(ids)
            if values is None or members is None:
                continue
            for member, scores in pd.Series(values, dtype=float).groupby(members, sort=True):
                n = int(scores.count())
                rows.append(
                    {
                        **{k: rec["cell"][k] for k in CELL_KEYS},
                        "task": _entry_label(rec, entry),
                        "subtask": member,
                        "metric": info["primary_metric"],
                        "value": float(scores.mean()),
                        "stderr": float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                        "n": n,
                    }
                )
    if not rows:
        return pd.DataFrame()
    return _in_cell_order(pd.DataFrame(rows).set_index([*CELL_KEYS, "task", "subtask"]))


CONSTANT_SHARE = 0.95  # a model giving one choice to this share of the items answers "constantly"
CONSTANT_MIN_ITEMS = 20  # fewer items than this say too little about an answer's spread


def _spread_row(choices: pd.Series, targets: pd.Series | None) -> dict | None:
    """The most common choice of a set of items, its share, how often it is the gold answer
    (the base rate a constant answer scores) and the accuracy; None when the items are few or
    their answers vary."""
    choices = choices.dropna().astype(int)
    n = int(choices.size)
    if n < CONSTANT_MIN_ITEMS:
        return None
    counts = choices.value_counts()
    choice, share = int(counts.index[0]), float(counts.iloc[0] / n)
    if share < CONSTANT_SHARE:
        return None
    row = {"n": n, "choice": choice, "share": share, "gold_share": math.nan, "accuracy": math.nan}
    if targets is not None:
        gold = targets.loc[choices.index].astype(float)
        row.update(gold_share=float((gold == choice).mean()), accuracy=float((gold == choices).mean()))
    return row


def constant_answer_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Multiple-choice entries on which a cell gives (nearly) the same answer to every item:
    the most common choice covers at least :data:`CONSTANT_SHARE` of them.  Such a score is
    that answer's base rate, not the ability the task measures, and a paired verdict between
    two such cells says only that quantization left an uninformative model uninformative.
    Groups of a few members (ETHICS) are read member by member -- each subset's choices mean
    different things -- and larger ones (MMLU) as a whole.  From the per-item tables'
    ``choice`` and ``target`` columns; empty when no cell answers constantly."""
    rows = []
    for rec in records:
        if rec.get("status") != "ok" or unreadable_reason(rec):
            continue
        for entry, table in (record_items(rec) or {}).items():
            if "choice" not in table:
                continue
            ids = [str(i) for i in table.get("id") or []]
            choices = pd.Series(table["choice"], index=ids, dtype=float)
            targets = pd.Series(table["target"], index=ids, dtype=float) if "target" in table else None
            labels = _small_group_members(ids)
            members = dict(iter(choices.groupby(labels, sort=True))) if labels else {"": choices}
            for member, part in members.items():
                row = _spread_row(part, targets)
                if row is not None:
                    rows.append(
                        {**{k: rec["cell"][k] for k in CELL_KEYS}, "task": _entry_label(rec, entry), "subtask": member}
                        | row
                    )
    if not rows:
        return pd.DataFrame()
    return _in_cell_order(pd.DataFrame(rows).set_index([*CELL_KEYS, "task", "subtask"]))


def not_ok_frame(records: Iterable[dict]) -> pd.DataFrame:
    """The cells that produced no scores, a row each: failed (with the error), skipped (with
    why the method, format or kernel cannot make that cell) or unreadable (an ok record whose
    scores are not numbers: :func:`unreadable_reason`, with its file)."""
    rows = []
    for rec in records:
        status, reason = rec.get("status"), rec.get("reason", "")
        if status == "ok" and (why := unreadable_reason(rec)):
            status, reason = "unreadable", f"{why} ({rec.get('_path', 'record')})"
        if status in ("failed", "skipped", "unreadable"):
            cell = rec.get("cell") if isinstance(rec.get("cell"), dict) else {}
            rows.append(
                {
                    **{k: cell.get(k) for k in CELL_KEYS},
                    "sweep": rec.get("sweep"),
                    "status": status,
                    "reason": reason,
                }
            )
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "sweep", "status", "reason"])


COVERAGE_KINDS = ("attention", "mlp", "experts", "router", "state_space", "embeddings", "head", "other")


def coverage_frame(records: Iterable[dict]) -> pd.DataFrame:
    """What each weight-quantized cell quantized (its record's coverage account,
    qeval.quant.coverage): the share of eligible weights, each kind's share of its weights,
    and what stayed in full precision with why.  Empty when no record has an account."""
    rows = []
    for rec in records:
        cov, cell = rec.get("coverage"), rec.get("cell") or {}
        if not cov or rec.get("status") != "ok" or "W" not in str(cell.get("tensor_type", "")):
            continue
        row: dict = {k: cell.get(k) for k in CELL_KEYS}
        row["eligible"] = cov.get("eligible")
        row["quantized"] = cov.get("share")
        for kind in COVERAGE_KINDS:
            counts = (cov.get("kinds") or {}).get(kind)
            if counts:
                total = sum(counts.values())
                row[kind] = counts.get("quantized", 0) / total if total else math.nan
        row["full precision"] = "; ".join(
            f"{g['kind']} {g['params']:,} ({g['reason'] or g['status']})" for g in cov.get("full_precision", [])
        )
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    kinds = [k for k in COVERAGE_KINDS if k in frame.columns]
    return frame[[*CELL_KEYS, "eligible", "quantized", *kinds, "full precision"]]


def efficiency_frame(records: Iterable[dict]) -> pd.DataFrame:
    """The efficiency records (benchmarks/efficiency.py) among ``records`` as one table,
    a row per timed point (empty when there are none)."""
    rows = []
    for rec in records:
        if rec.get("kind") != "efficiency":
            continue
        for t in rec["timings"]:
            rows.append(
                {
                    "model": rec.get("model"),
                    "quant": rec.get("quant"),
                    "method": rec.get("method"),
                    "scheme": rec.get("scheme"),
                    "device": rec.get("device"),
                    "dtype": rec.get("engine", {}).get("dtype"),
                    "weight_MB": rec["weight_bytes"] / 2**20,
                    "kv_bytes_per_token": rec["kv_bytes_per_token"],
                    "batch": t["batch"],
                    "input_len": t["input_len"],
                    "prefill_s": t["prefill_s"],
                    "decode_ms_per_token": 1000 * t["decode_s_per_token"],
                    "e2e_s": t["e2e_s"],
                    "throughput_tok_s": t["throughput_tok_s"],
                }
            )
    return pd.DataFrame(rows)


def missing_baselines(long: pd.DataFrame) -> list[str]:
    """One line per (model, suite, backend) with quantized scores but no unquantized (FP) cell
    to compare them with: its ratios, families, verdicts and recommendations cannot be computed."""
    group = ["model", "suite", "backend"]
    have = set(map(tuple, long.loc[long.tensor_type == "FP", group].drop_duplicates().values))
    lines = []
    for key, part in long[long.tensor_type != "FP"].groupby(group):
        if tuple(key) not in have:
            model, suite, backend = key
            lines.append(
                f"Baseline missing: {model} (suite {suite}, backend {backend}) has no unquantized (FP) cell with "
                f"scores, so its {part['quant'].nunique()} quantized configuration(s) are shown as raw scores "
                "only: no ratios to FP, verdicts or recommendations (add quant=fp16 to the sweep)."
            )
    return lines


def add_normalized(long: pd.DataFrame) -> pd.DataFrame:
    """Add ``fp_value``/``fp_stderr`` (the same model's FP cell) and ``normalized`` = value /
    fp_value.  Descriptive only: whether a difference is real is the paired test's business
    (:func:`qeval.report.verdicts.mark_significant`), never a comparison of two unpaired
    standard errors, which both ignores that the cells scored the same items and calls
    noise on 4 items a loss."""
    group = ["model", "suite", "backend", "metric"]
    fp = long[long.tensor_type == "FP"].groupby(group)
    base = pd.concat([fp["value"].first().rename("fp_value"), fp["stderr"].first().rename("fp_stderr")], axis=1)
    out = long.drop(columns=[c for c in ("fp_value", "fp_stderr") if c in long]).join(base, on=group)
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
    return _in_cell_order(table)


def _in_cell_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows indexed by CELL_KEYS (then any further levels) in reading order: model, tensor
    type, bits (most first), preset, method, backend."""
    return table.loc[sorted(table.index, key=lambda k: (k[0], TT_ORDER.get(k[1], 9), _bits_key(k[2]), *k[3:]))]


def _bits_key(label: str) -> tuple:
    digits = [int(s) for s in re.findall(r"\d+", label)]
    return tuple(-d for d in digits)


def family_table(long: pd.DataFrame) -> pd.DataFrame:
    """Quality retained per family: the mean over a family's tasks of the primary metric
    relative to the unquantized model, oriented so that 1 = unchanged and below 1 = worse
    (value/FP where higher is better, FP/value where lower is better, e.g. perplexity)."""
    prim = add_normalized(long[long.primary]) if "normalized" not in long else long[long.primary].copy()
    # a ratio to an FP score of 0 (or to a missing one) says nothing: left out of the mean
    prim = prim.assign(retained=[retained(n, hib) for n, hib in zip(prim["normalized"], prim["higher_is_better"])])
    table = prim.pivot_table(index=CELL_KEYS, columns="family", values="retained", aggfunc="mean")
    table = table[[f for f in FAMILIES if f in table.columns] + [f for f in table.columns if f not in FAMILIES]]
    return _in_cell_order(table)


def retained(normalized: float, higher_is_better: bool) -> float:
    """value/FP oriented so that 1 = unchanged and 0 = nothing left; NaN where FP's score is 0
    (or missing), which makes the ratio meaningless.  A task that drops to 0 retains 0."""
    if normalized is None or not math.isfinite(normalized):
        return float("nan")
    if higher_is_better:
        return normalized
    return 1 / normalized if normalized > 0 else float("nan")


def primary_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, the primary metric of each task (with /FP), the table to read first."""
    return cell_table(long[long.primary].drop(columns=[c for c in DERIVED if c in long]))


FAKE_BACKEND, REAL_BACKEND = "hf", "vllm"


def agreement_table(long: pd.DataFrame, ppl_rtol: float = 0.01, n_se: float = 2.0) -> pd.DataFrame:
    """Fake quantization (hf) against real kernels (vllm), for every cell run on both.

    A row per (cell, primary metric).  Perplexity-like metrics (lower is better)
    agree when the relative difference is at most ``ppl_rtol``; scores with a
    standard error agree when the difference is within ``n_se`` standard errors of
    a difference (sqrt(se_fake^2 + se_real^2); conservative, since both backends
    score the same items).  Empty when no cell ran on both backends.
    """
    keys = [k for k in CELL_KEYS if k != "backend"] + ["suite", "metric"]
    prim = long[long.primary]
    fake = prim[prim.backend == FAKE_BACKEND].set_index(keys)[["value", "stderr", "higher_is_better"]]
    real = prim[prim.backend == REAL_BACKEND].set_index(keys)[["value", "stderr"]]
    both = fake.join(real, how="inner", lsuffix="_fake", rsuffix="_real")
    if both.empty:
        return pd.DataFrame()
    both = both.rename(columns={"value_fake": "fake_quant", "value_real": "real_kernel"})
    both["diff"] = both["real_kernel"] - both["fake_quant"]
    rows = []
    for _, r in both.iterrows():
        se = math.sqrt((r.stderr_fake or 0.0) ** 2 + (r.stderr_real or 0.0) ** 2)
        if not r.higher_is_better or not se:  # perplexity-like, or a score without stderr
            tolerance, rule = ppl_rtol * abs(r.fake_quant), f"{ppl_rtol:.0%} relative"
        else:
            tolerance, rule = n_se * se, f"{n_se:g} SE"
        rows.append({"tolerance": tolerance, "rule": rule, "agree": abs(r["diff"]) <= tolerance})
    out = both.assign(**pd.DataFrame(rows, index=both.index))
    out["rel_diff"] = out["diff"] / out["fake_quant"]
    return out[["fake_quant", "real_kernel", "diff", "rel_diff", "tolerance", "rule", "agree"]]


DERIVED = ["fp_value", "fp_stderr", "normalized", "significant"]


def marked_table(long: pd.DataFrame) -> pd.DataFrame:
    """Primary metrics as text, one row per cell: value, ± standard error, and ``*`` where
    the paired test against the unquantized model finds a difference (``significant``)."""
    prim = long[long.primary]

    def fmt(r) -> str:
        text = f"{r.value:.4g}"
        if r.stderr is not None and pd.notna(r.stderr):
            text += f" ± {r.stderr:.2g}"
        mark = getattr(r, "significant", None)
        return text + (" *" if mark is not None and mark is not pd.NA and bool(mark) else "")

    prim = prim.assign(text=[fmt(r) for r in prim.itertuples()])
    table = prim.pivot_table(index=CELL_KEYS, columns="metric", values="text", aggfunc="first")
    return _in_cell_order(table).fillna("")


def views(long: pd.DataFrame, key: str) -> dict[str, pd.DataFrame]:
    """One primary-metric table per value of ``key`` (tensor_type or method), each with the
    unquantized rows it is normalized to."""
    raw = long.drop(columns=[c for c in DERIVED if c in long])
    fp = raw[raw.tensor_type == "FP"]
    out = {}
    for value in sorted(raw.loc[raw.tensor_type != "FP", key].unique()):
        part = pd.concat([fp, raw[(raw[key] == value) & (raw.tensor_type != "FP")]])
        out[str(value)] = primary_table(part)
    return out


def report_name(results_dirs: list[Path]) -> str:
    """The report's name: its sweeps' folder names joined with ``+``."""
    return "+".join(d.name for d in results_dirs)


def bit_width(tensor_type: str, bits: str) -> float:
    """The bit-width a cell varies: weights for W/WA, the cache for KV; 16 for FP."""
    if tensor_type == "FP":
        return FP_BITS
    part = "KV" if tensor_type == "KV" else "W"
    match = re.search(rf"{part}(\d+)", bits)
    return float(match.group(1)) if match else math.nan


def weight_bits_per_param(bits: str) -> float:
    """Weight memory per parameter: the code width plus a 16-bit scale per group
    (the memory axis of the accuracy-vs-memory plot and of the recommendations)."""
    match = re.search(r"W(\d+)(?:g(\d+))?", bits)
    if not match:
        return float(FP_BITS)
    width, group = int(match.group(1)), match.group(2)
    fmt = label_weight_format(bits)
    if fmt in FORMAT_SCALE_BITS:
        return width + FORMAT_SCALE_BITS[fmt]
    return width + (16 / int(group) if group else 0.0)
