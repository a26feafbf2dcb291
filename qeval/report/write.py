"""The report's entry module: the one place that writes files.

``write_tables`` reads one or several sweep folders once, has the leaf modules compute
everything (:mod:`qeval.report.frames`: the frames; :mod:`qeval.report.plots`: the figures;
:mod:`qeval.report.recommend`: recommendations and findings; :mod:`qeval.report.html`: the
page) and writes it under ``plots/<sweep>[+<sweep>...]/``: tables as CSV, Markdown and
LaTeX, figures as PNG and SVG, ``report.html``.  The leaves import nothing from here, so the
package has no import cycle and each leaf can be used (and tested) on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (and no display needed)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qeval.report.frames import (  # noqa: E402
    CELL_KEYS,
    DERIVED,
    add_normalized,
    agreement_table,
    cell_table,
    constant_answer_frame,
    coverage_frame,
    efficiency_frame,
    family_table,
    long_frame,
    marked_table,
    missing_baselines,
    not_ok_frame,
    primary_table,
    read_sweeps,
    report_name,
    response_frame,
    subtask_frame,
    unreadable_reason,
    views,
)
from qeval.report.html import render_html  # noqa: E402
from qeval.report.plots import all_figures  # noqa: E402
from qeval.report.recommend import constant_answer_findings, recommendations, summary  # noqa: E402
from qeval.report.verdicts import (  # noqa: E402
    DEFAULT_ALPHA,
    DEFAULT_CORRECTION,
    divergence_frame,
    family_verdicts,
    mark_significant,
    paired_frame,
)


def save_figure(fig: Figure, out: Path, name: str) -> Path:
    """``out/<name>.png`` (120 dpi) and an SVG twin; closes the figure; returns the PNG's path."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(png.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
    return png


def write_table(table: pd.DataFrame, stem: Path, floatfmt: str = ".4g") -> list[Path]:
    """CSV, Markdown and LaTeX of one table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    table.to_csv(files[0])
    flat = table.reset_index()
    files[1].write_text(flat.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    files[2].write_text(flat.to_latex(index=False, float_format=lambda v: format(v, floatfmt), na_rep="--"))
    return files


def no_scores_message(folder: Path, records: list[dict]) -> str:
    """Why a folder has nothing to tabulate: its cells' statuses, and each one's reason."""
    if not records:
        return f"no cell records under {folder}"
    not_ok = not_ok_frame(records)
    counts = not_ok["status"].value_counts()
    lines = [f"no cell under {folder} produced scores ({', '.join(f'{n} {s}' for s, n in counts.items())}):"]
    lines += [f"  {r.status}: {r.model} {r.quant} {r.method} ({r.reason})" for r in not_ok.itertuples()]
    return "\n".join(lines)


def _section(table: pd.DataFrame, stem: Path, files: list[Path], heading: str, floatfmt: str) -> str:
    """An optional table of the summary: written as CSV/Markdown/LaTeX (appended to ``files``)
    and returned as its summary paragraph; nothing when ``table`` is empty."""
    if table.empty:
        return ""
    files += write_table(table, stem)
    return f"\n\n{heading}\n\n" + table.reset_index().to_markdown(index=False, floatfmt=floatfmt)


def write_tables(
    results_dirs: str | Path | Iterable[str | Path],
    out_dir: str | Path | None = None,
    ppl_rtol: float = 0.01,
    n_se: float = 2.0,
    keep: float = 0.98,
    alpha: float = DEFAULT_ALPHA,
    correction: str = DEFAULT_CORRECTION,
) -> tuple[str, list[Path]]:
    """Write every table of one or several sweeps (compared together) and return the Markdown
    to print (families, primary metrics, agreement) and the files written.

    Files (CSV, plus Markdown and LaTeX for the tables meant for reading): the long frame with
    standard errors, normalization and significance; every metric; primary metrics (numbers
    and the marked text version); families; one view per tensor type and per method; the
    fake-vs-real agreement when cells ran on both backends.
    """
    dirs = [Path(results_dirs)] if isinstance(results_dirs, (str, Path)) else [Path(d) for d in results_dirs]
    records = []
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"results folder {d} does not exist")
        in_dir = read_sweeps([d])
        if not any(rec.get("status") == "ok" and not unreadable_reason(rec) for rec in in_dir):
            raise ValueError(no_scores_message(d, in_dir))  # (efficiency records count: they add a section)
        records += in_dir
    paired = paired_frame(records, keep, alpha, correction)
    verdicts = family_verdicts(paired)
    divergence = divergence_frame(records)
    long = mark_significant(add_normalized(long_frame(records)), paired, alpha)
    raw = long.drop(columns=DERIVED)
    table = cell_table(raw)
    primary = primary_table(raw)
    families = family_table(long)
    out = Path(out_dir) if out_dir else Path("plots") / report_name(dirs)
    out.mkdir(parents=True, exist_ok=True)
    files = [
        out / "scores_long.csv",
        out / "table.csv",
        out / "table.md",
        out / "primary.csv",
        out / "families.csv",
        out / "families.md",
    ]
    long.to_csv(files[0], index=False)
    table.to_csv(files[1])
    files[2].write_text(table.reset_index().to_markdown(index=False, floatfmt=".4g") + "\n")
    primary.to_csv(files[3])
    families.to_csv(files[4])
    fam_md = families.reset_index().to_markdown(index=False, floatfmt=".3f")
    files[5].write_text(fam_md + "\n")
    files += [out / "families.tex", out / "primary.md", out / "primary.tex"]
    files[-3].write_text(families.reset_index().to_latex(index=False, float_format="%.3f", na_rep="--"))
    files[-2].write_text(primary.reset_index().to_markdown(index=False, floatfmt=".4g") + "\n")
    files[-1].write_text(primary.reset_index().to_latex(index=False, float_format="%.4g", na_rep="--"))
    marked = marked_table(long)
    files += write_table(marked, out / "primary_marked")
    all_views = {}
    for key, folder in (("tensor_type", "by_tensor_type"), ("method", "by_method")):
        all_views[key] = views(long, key)
        for value, view in all_views[key].items():
            files += write_table(view, out / folder / value.replace("+", "_"))
    efficiency = efficiency_frame(records)
    figures = [
        save_figure(fig, out / "figures", name) for name, fig in all_figures(long, families, efficiency, divergence)
    ]
    files += figures
    constant = constant_answer_frame(records)
    advice = recommendations(verdicts, paired, keep, constant)
    baseline_lines = missing_baselines(raw)
    has_baseline = bool((raw.tensor_type == "FP").any())
    # with no baseline at all, "no paired verdicts" has one reason, said by the baseline lines
    findings = (
        baseline_lines
        + ([] if baseline_lines and verdicts.empty else summary(verdicts, paired, keep, divergence))
        + constant_answer_findings(constant)
    )
    files += [out / "recommendations.csv", out / "recommendations.md", out / "summary.md"]
    advice.to_csv(files[-3], index=False)
    advice_md = advice.to_markdown(index=False, floatfmt=".3f")
    files[-2].write_text(advice_md + "\n")
    files[-1].write_text("\n".join(f"- {line}" for line in findings) + "\n")
    markdown = "".join(f"{line}\n\n" for line in baseline_lines)
    if not verdicts.empty:
        files += write_table(verdicts, out / "verdicts")
        files.append(out / "paired.csv")
        paired.to_csv(files[-1], index=False)
        markdown += (
            f"verdicts per family (paired with the unquantized cell; within = the 95% interval of retained "
            f"quality lies above {keep:.0%}, loss = significantly below it after {correction} correction)\n\n"
            + verdicts.reset_index().to_markdown(index=False)
            + "\n\n"
        )
    if not divergence.empty:
        files += write_table(divergence.set_index([*CELL_KEYS, "task"]), out / "divergence")
        markdown += (
            "distribution-level damage on the perplexity corpus (KL divergence from the unquantized model, "
            "per token)\n\n" + divergence.to_markdown(index=False, floatfmt=".4g") + "\n\n"
        )
    if has_baseline:
        markdown += (
            "quality retained per family (1 = unquantized; primary metric of each task, "
            "oriented so that lower is worse; descriptive: the verdicts above are the tests)\n\n" + fam_md + "\n\n"
        )
    markdown += (
        "primary metrics\n\n"
        + primary.reset_index().to_markdown(index=False, floatfmt=".4g")
        + f"\n\nwith standard errors (* = the paired test finds a difference, adjusted p < {alpha:g})\n\n"
        + marked.reset_index().to_markdown(index=False)
    )
    if has_baseline:
        markdown += (
            f"\n\nrecommended (least memory confidently within {keep:.0%} of the unquantized quality, per family)\n\n"
            + advice_md
        )
    markdown += "\n\nfindings\n\n" + "\n".join(f"- {line}" for line in findings)
    agreement = agreement_table(raw, ppl_rtol, n_se)
    if not agreement.empty:
        agree_md = agreement.reset_index().to_markdown(index=False, floatfmt=".4g")
        files += [out / "agreement.csv", out / "agreement.md"]
        agreement.to_csv(files[-2])
        files[-1].write_text(agree_md + "\n")
        n_bad = int((~agreement["agree"]).sum())
        markdown += (
            f"\n\nfake quant (hf) vs real kernels (vllm): {len(agreement) - n_bad} of {len(agreement)} "
            "agree" + (f", {n_bad} DISAGREE" if n_bad else "") + "\n\n" + agree_md
        )
    if not efficiency.empty:
        files.append(out / "efficiency.csv")
        efficiency.to_csv(files[-1], index=False)
    weights = coverage_frame(records)
    if not weights.empty:
        files += write_table(weights.set_index(CELL_KEYS), out / "coverage")
        markdown += (
            "\n\nweights quantized (share of the eligible weights, and of each kind's weights; what stayed in "
            "full precision and why)\n\n" + weights.to_markdown(index=False, floatfmt=".3g")
        )
    responses = response_frame(raw)
    markdown += _section(
        responses,
        out / "responses",
        files,
        "generation tasks: score beside the answers' shape (length in tokens, mean and p90; shares "
        "truncated at the budget, with an unclosed reasoning block, with any reasoning block, looping)",
        ".3g",
    )
    subtasks = subtask_frame(records)
    markdown += _section(
        subtasks,
        out / "subtasks",
        files,
        "groups, member by member (primary metric per subtask from the per-item tables; "
        "descriptive: the verdicts test the group)",
        ".4g",
    )
    markdown += _section(
        constant,
        out / "constant_answers",
        files,
        "multiple-choice entries answered (nearly) the same for every item (share of the most common "
        "choice, how often that choice is the gold answer, accuracy): scores there are base rates",
        ".3g",
    )
    not_ok = not_ok_frame(records)
    if not not_ok.empty:
        files += [out / "not_run.csv", out / "not_run.md"]
        not_ok.to_csv(files[-2], index=False)
        not_ok_md = not_ok.to_markdown(index=False)
        files[-1].write_text(not_ok_md + "\n")
        markdown += f"\n\ncells without scores (failed, skipped or unreadable)\n\n{not_ok_md}"
    page = out / "report.html"
    page.write_text(
        render_html(
            f"qeval report: {report_name(dirs)}",
            findings,
            families,
            advice,
            marked,
            all_views["tensor_type"],
            all_views["method"],
            figures,
            agreement,
            efficiency,
            keep,
            not_ok,
            verdicts,
            divergence,
            paired,
            weights,
            responses,
            subtasks,
            constant,
        ),
        encoding="utf-8",
    )
    files.append(page)
    return markdown, files
