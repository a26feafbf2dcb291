"""``report.html``: one self-contained page (figures embedded as data URIs) that reads in a browser.

Sections: overview (findings, families, recommendations), one per tensor type, per method,
per family, fake-vs-real agreement and efficiency when the sweep has them.  Everything on the
page is already computed by the frame, plot and recommendation modules; this module only lays
it out, so the page can never say something the CSV files do not.  A leaf of
:mod:`qeval.report`: it returns the page as text (reading the saved PNGs to embed them) and
:mod:`qeval.report.write` writes it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from qeval.report.frames import CELL_KEYS, TT_ORDER

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
.scroll { overflow-x: auto; max-width: 100%; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
nav a { margin-right: 1em; } .bad { color: #b00; font-weight: bold; } .note { color: #555; }
"""


def _figure(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    flat = (df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df).copy()
    flat.columns.name = None  # a pivot's column label would become an empty first column
    body = flat.to_html(index=False, float_format=lambda v: floatfmt.format(v), na_rep="", border=0, escape=True)
    return f"<div class='scroll'>{body}</div>"  # a wide table scrolls inside its box, not the page


def render_html(
    title: str,
    findings: list[str],
    families: pd.DataFrame,
    advice: pd.DataFrame,
    marked: pd.DataFrame,
    tensor_views: dict[str, pd.DataFrame],
    method_views: dict[str, pd.DataFrame],
    figures: list[Path],
    agreement: pd.DataFrame,
    efficiency: pd.DataFrame,
    keep: float,
    not_ok: pd.DataFrame | None = None,
    verdicts: pd.DataFrame | None = None,
    divergence: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
    coverage: pd.DataFrame | None = None,
    responses: pd.DataFrame | None = None,
    subtasks: pd.DataFrame | None = None,
    constant: pd.DataFrame | None = None,
) -> str:
    """Lay out the report: the whole page, figures (``figures``: the saved PNGs) embedded."""
    by_name = {f.stem: f for f in figures}
    sections: list[tuple[str, str, str]] = []  # (anchor, heading, body)

    overview = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in findings) + "</ul>"
    if verdicts is not None and not verdicts.empty:
        overview += (
            f"<h3>Verdicts per family</h3><p class='note'>Each quantized cell paired item by item with the "
            f"unquantized cell: <b>within</b> = the 95% interval of retained quality lies above {keep:.0%} on "
            "every task of the family; <b>loss</b> = significantly below it (adjusted for the report's many "
            "comparisons); <b>inconclusive</b> = neither, at these sample sizes.</p>" + _table(verdicts)
        )
    if divergence is not None and not divergence.empty:
        overview += (
            "<h3>Distribution-level damage</h3><p class='note'>KL divergence of the quantized model's next-token "
            "distributions from the unquantized model's on the perplexity corpus (per token), top-1 agreement, "
            "RMS change of the reference token's probability, ln(PPL ratio).</p>" + _table(divergence)
        )
        overview += "".join(
            _figure(f, name.replace("_", " ")) for name, f in by_name.items() if name.startswith("divergence_")
        )
    overview += (
        "<h3>Quality retained per family</h3><p class='note'>1 = unquantized; the mean over a family's "
        "tasks of the primary metric relative to the unquantized model, oriented so that lower is worse "
        "(descriptive: the verdicts above are the tests).</p>"
    )
    overview += _table(families, "{:.3f}")
    overview += f"<h3>Recommendations (least memory confidently within {keep:.0%})</h3>" + _table(advice, "{:.3f}")
    overview += (
        "<h3>Primary metrics</h3><p class='note'>± one standard error; * = the paired test against the "
        "unquantized model finds a difference (adjusted p below alpha).</p>" + _table(marked)
    )
    sections.append(("overview", "Overview", overview))
    if paired is not None and not paired.empty:
        sections.append(
            (
                "paired",
                "Paired comparisons",
                "<p class='note'>One row per quantized cell and task: retained quality with its 95% interval, "
                "the paired test and its adjusted p-value, flips (right to wrong, wrong to right) and the "
                "verdict.</p>" + _table(paired.set_index(CELL_KEYS), "{:.3g}"),
            )
        )

    for tt, view in sorted(tensor_views.items(), key=lambda kv: TT_ORDER.get(kv[0], 9)):
        rows = marked[marked.index.get_level_values("tensor_type").isin(["FP", tt])]
        body = (
            "<p class='note'>± one standard error; * = the paired test finds a difference from "
            "unquantized.</p>" + _table(rows) + "<p class='note'>Relative to unquantized (/FP):</p>" + _table(view)
        )
        key = f"score_vs_bits_{tt.replace('+', '_')}"
        if key in by_name:
            body += _figure(by_name[key], f"{tt}: score vs bit-width")
        sections.append((f"tt-{tt}", f"Tensor type {tt}", body))

    body = "".join(f"<h3>{html.escape(m)}</h3>" + _table(v) for m, v in method_views.items())
    if "methods_by_bits" in by_name:
        body = _figure(by_name["methods_by_bits"], "methods at each bit setting") + body
    sections.append(("methods", "Methods", body))

    family_figs = [
        f for name, f in by_name.items() if name.startswith(("families_radar", "abilities_radar")) or name == "heatmap"
    ]
    family_figs += [f for name, f in by_name.items() if name.startswith(("long_context", "dialogue"))]
    body = "".join(_figure(f, f.stem.replace("_", " ")) for f in family_figs)
    sections.append(("families", "Task families", body or "<p>No per-family figure applies.</p>"))

    if "quality_vs_memory" in by_name:
        body = _figure(by_name["quality_vs_memory"], "quality vs memory")
        if "quality_vs_latency" in by_name:
            body += _figure(by_name["quality_vs_latency"], "quality vs latency")
        sections.append(("memory", "Quality vs memory and latency", body))

    if coverage is not None and not coverage.empty:
        sections.append(
            (
                "coverage",
                "Weights quantized",
                "<p class='note'>Per weight-quantized cell: the share of the eligible weights quantized (a cell "
                "that leaves more than 2% of them in full precision fails, naming them), each kind's share of "
                "its weights, and what stayed in full precision and why.</p>"
                + _table(coverage.set_index(CELL_KEYS), "{:.3g}"),
            )
        )
    if responses is not None and not responses.empty:
        sections.append(
            (
                "responses",
                "Generation: score beside length",
                "<p class='note'>Per generation task: the primary score (n items) beside the answers' length "
                "in tokens (mean, p90) and the shares truncated at the token budget, with an unclosed reasoning "
                "block (no answer), with any reasoning block, and looping (half the words in repeated "
                "4-grams).</p>" + _table(responses, "{:.3g}"),
            )
        )
    if subtasks is not None and not subtasks.empty:
        sections.append(
            (
                "subtasks",
                "Groups, member by member",
                "<p class='note'>Each member of a small group (the five ETHICS subsets): its primary metric, "
                "standard error and item count, from the per-item tables. Descriptive: the verdicts test "
                "the group.</p>" + _table(subtasks, "{:.3g}"),
            )
        )
    if constant is not None and not constant.empty:
        sections.append(
            (
                "constant-answers",
                "Same answer to every item",
                "<p class='note'>Multiple-choice entries where a cell gives one choice to at least 95% of the "
                "items (per member for small groups): its share, how often that choice is the gold answer (the "
                "accuracy a constant answer scores) and the accuracy. Such a score is a base rate; a verdict "
                "between two such cells says nothing about the ability the task measures.</p>"
                + _table(constant, "{:.3g}"),
            )
        )
    if not agreement.empty:
        n_bad = int((~agreement["agree"]).sum())
        head = (
            f"<p>{len(agreement) - n_bad} of {len(agreement)} comparisons agree"
            + (f", <span class='bad'>{n_bad} disagree</span>" if n_bad else "")
            + ".</p>"
        )
        sections.append(("agreement", "Fake quantization vs real kernels", head + _table(agreement)))
    if not efficiency.empty:
        sections.append(("efficiency", "Efficiency (real kernels)", _table(efficiency)))
    if not_ok is not None and not not_ok.empty:
        counts = not_ok["status"].value_counts()
        head = (
            "<p>"
            + ", ".join(f"{n} {status}" for status, n in counts.items())
            + ": these cells have no scores and appear in no table or figure above.</p>"
        )
        sections.append(("not-run", "Failed, skipped and unreadable cells", head + _table(not_ok.set_index(CELL_KEYS))))

    nav = "<nav>" + "".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _ in sections) + "</nav>"
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{nav}"
        + "".join(f'<h2 id="{a}">{html.escape(h)}</h2>{b}' for a, h, b in sections)
        + "</body></html>"
    )
