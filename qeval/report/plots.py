"""Figures from the result store (matplotlib), all drawn from the long frame.

A leaf of :mod:`qeval.report`: every function takes the long frame with normalization
(:func:`qeval.report.frames.add_normalized`) or the family table and yields its figures as
``(name, figure)`` pairs, one at a time; :mod:`qeval.report.write` saves each (PNG + SVG)
and closes it before the next is drawn.  A figure whose data is absent from the sweep (no KV
cells, one method only, no long-context task) is simply not drawn, so any sweep gets every
plot that applies to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import matplotlib

matplotlib.use("Agg")  # files only, never a window (and no display needed)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qeval.report.frames import TT_ORDER, bit_width, retained, weight_bits_per_param  # noqa: E402

RADAR_CAP = 1.25
NamedFigures = Iterator[tuple[str, Figure]]  # (file stem, figure)


def _texts(fig: Figure) -> list[tuple[int, str, str, object]]:
    """(axes index or -1 for the figure, kind, text, window extent) of every visible, non-empty
    title, axis label and tick label of ``fig`` (legends and in-plot annotations excluded)."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    out: list[tuple[int, str, str, object]] = []

    def add(owner: int, kind: str, artist: object) -> None:
        if artist.get_visible() and artist.get_text().strip():  # type: ignore[attr-defined]
            out.append((owner, kind, artist.get_text(), artist.get_window_extent(renderer)))  # type: ignore[attr-defined]

    if fig._suptitle is not None:  # type: ignore[attr-defined]
        add(-1, "suptitle", fig._suptitle)  # type: ignore[attr-defined]
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        for title in (ax.title, ax._left_title, ax._right_title):  # type: ignore[attr-defined]
            add(i, "title", title)
        add(i, "xlabel", ax.xaxis.label)
        add(i, "ylabel", ax.yaxis.label)
        for kind, axis in (("xtick", ax.xaxis), ("ytick", ax.yaxis)):
            # the ticks drawn (inside the view), not every tick object the axis keeps
            for tick in axis._update_ticks():  # type: ignore[attr-defined]
                for label in (tick.label1, tick.label2):
                    add(i, kind, label)
    return out


def text_overlaps(fig: Figure, tolerance_px: float = 1.0) -> list[str]:
    """Pairs of titles, axis labels and tick labels of ``fig`` whose boxes overlap once drawn
    (by more than ``tolerance_px`` in both directions), as "'a' (kind, axes i) / 'b' (...)".

    Why: subplot titles, axis labels and rotated tick labels of neighbouring panels collide
    when names are long or panels many; the report's tests and :func:`save_figure`'s warning
    check every figure with it.
    """
    fig.canvas.draw()
    texts = _texts(fig)
    found = []
    for a in range(len(texts)):
        for b in range(a + 1, len(texts)):
            (ia, ka, ta, ba), (ib, kb, tb, bb) = texts[a], texts[b]
            dx = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)  # type: ignore[attr-defined]
            dy = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)  # type: ignore[attr-defined]
            if dx > tolerance_px and dy > tolerance_px:
                found.append(f"{ta!r} ({ka}, axes {ia}) / {tb!r} ({kb}, axes {ib})")
    return found


def _backend_tag(backend: str) -> str:
    """Labels name the backend only when it is not the default fake-quant one."""
    return "" if backend == "hf" else f" [{backend}]"


def _withretained(long: pd.DataFrame) -> pd.DataFrame:
    prim = long[long.primary].copy()
    prim["retained"] = [retained(n, h) for n, h in zip(prim["normalized"], prim["higher_is_better"])]
    return prim


def score_vs_bits(long: pd.DataFrame) -> NamedFigures:
    """Per tensor type: each task's primary metric against bit-width, one line per model and
    method, FP as the 16-bit point, error bars of one standard error."""
    prim = long[long.primary].copy()
    prim["bit_width"] = [bit_width(t, b) for t, b in zip(prim.tensor_type, prim.bits)]
    for tt in sorted(set(prim.tensor_type) - {"FP"}, key=lambda t: TT_ORDER.get(t, 9)):
        part = prim[prim.tensor_type.isin([tt, "FP"])]
        metrics = sorted(part.metric.unique())
        cols = min(3, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
        for ax, metric in zip(axes.flat, metrics):
            m = part[part.metric == metric]
            fp = m[m.tensor_type == "FP"]
            for (model, method, backend), s in m[m.tensor_type == tt].groupby(["model", "method", "backend"]):
                s = pd.concat([s, fp[(fp.model == model) & (fp.backend == backend)]])
                s = s.groupby("bit_width").first().sort_index()  # one point per width (first preset)
                ax.errorbar(
                    s.index,
                    s["value"],
                    yerr=pd.to_numeric(s["stderr"], errors="coerce"),
                    marker="o",
                    capsize=3,
                    label=f"{model} / {method}{_backend_tag(backend)}",
                )
            ax.set_title(metric, fontsize=9)
            ax.set_xlabel(f"{'KV' if tt == 'KV' else 'weight'} bits")
            if not m.higher_is_better.dropna().empty and not bool(m.higher_is_better.dropna().iloc[0]):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(metrics) :]:
            ax.axis("off")
        if axes.flat[0].get_legend_handles_labels()[0]:
            axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{tt}: score vs bit-width (error bars: 1 standard error)")
        yield f"score_vs_bits_{tt.replace('+', '_')}", fig


def method_bars(long: pd.DataFrame) -> NamedFigures:
    """Methods side by side at each bit setting: mean quality retained over tasks."""
    prim = _withretained(long)
    prim = prim[prim.tensor_type != "FP"]
    if prim.method.nunique() < 2:
        return
    table = prim.pivot_table(index=["tensor_type", "bits"], columns="method", values="retained", aggfunc="mean")
    if table.empty:
        return  # nothing is relative to an unquantized cell (a sweep without one)
    table = table.loc[sorted(table.index, key=lambda k: (TT_ORDER.get(k[0], 9), -bit_width(k[0], k[1])))]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(table)), 3.6), layout="constrained")
    table.plot.bar(ax=ax, width=0.8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("quality retained (1 = unquantized)")
    ax.set_xticklabels([f"{tt} {b}" for tt, b in table.index], rotation=30, ha="right")
    ax.set_xlabel("")
    ax.set_title("methods at each bit setting (mean over tasks)")
    yield "methods_by_bits", fig


def heatmap(long: pd.DataFrame) -> NamedFigures:
    """Quality retained per configuration (rows) and task (columns)."""
    prim = _withretained(long)
    prim["config"] = [
        f"{r.bits} {r.method}{_backend_tag(r.backend)}" + (f" ({r.model})" if prim.model.nunique() > 1 else "")
        for r in prim.itertuples()
    ]
    table = prim.pivot_table(index="config", columns="task", values="retained", aggfunc="mean")
    if table.empty:
        return
    order = prim.drop_duplicates("config").set_index("config")
    table = table.loc[
        sorted(
            table.index,
            key=lambda c: (
                TT_ORDER.get(order.loc[c, "tensor_type"], 9),
                -bit_width(order.loc[c, "tensor_type"], order.loc[c, "bits"]),
                c,
            ),
        )
    ]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(table.columns), 0.8 + 0.35 * len(table)), layout="constrained")
    image = ax.imshow(table.values, cmap="RdYlGn", vmin=0.5, vmax=1.1, aspect="auto")
    ax.set_xticks(range(len(table.columns)), table.columns, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    for i in range(len(table)):
        for j in range(len(table.columns)):
            v = table.values[i, j]
            if pd.notna(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="quality retained")
    ax.set_title("quality retained per task (1 = unquantized)")
    yield "heatmap", fig


def _radial_labels_between_spokes(ax: object, spokes: int, top: float) -> None:
    """Radial tick labels half-way between the first two spokes and inside the outer ring, so
    they never run into the spokes' category labels."""
    ax.set_rlabel_position(180.0 / spokes)  # type: ignore[attr-defined]
    ax.set_yticks([t for t in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0) if t < top * 0.97])  # type: ignore[attr-defined]
    ax.tick_params(axis="y", labelsize=7)  # type: ignore[attr-defined]


def family_profiles(families: pd.DataFrame) -> NamedFigures:
    """A radar per model: each configuration's quality retained per family."""
    if families.shape[1] < 3:
        return  # a radar needs three axes; the family table says it all
    for model, part in families.groupby(level="model"):
        labels = list(part.columns)
        angles = [2 * math.pi * i / len(labels) for i in range(len(labels))] + [0.0]
        fig, ax = plt.subplots(figsize=(5.5, 5.5), subplot_kw={"polar": True}, layout="constrained")
        for key, row in part.iterrows():
            values = list(row.values) + [row.values[0]]
            ax.plot(angles, values, marker="o", ms=3, label=f"{key[2]} {key[4]}{_backend_tag(key[5])}")
        ax.set_xticks(angles[:-1], labels, fontsize=8)
        top = max(1.1, float(part.max().max()) * 1.05)
        ax.set_ylim(0, top)
        _radial_labels_between_spokes(ax, len(labels), top)
        ax.legend(fontsize=6, loc="upper right", bbox_to_anchor=(1.45, 1.1))
        ax.set_title(f"{model}: quality retained per family")
        yield f"families_radar_{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}", fig


def ability_profiles(long: pd.DataFrame) -> NamedFigures:
    """A radar per model over the abilities (each task's primary metric, retained), e.g.
    in-context learning, instruction following, reasoning and self-calibration side by side."""
    prim = _withretained(long)
    table = prim.pivot_table(
        index=["model", "bits", "method", "backend"], columns="task", values="retained", aggfunc="mean"
    )
    if table.shape[1] < 3:
        return
    for model, part in table.groupby(level="model"):
        part = part.dropna(axis=1, how="all")
        labels = list(part.columns)
        angles = [2 * math.pi * i / len(labels) for i in range(len(labels))] + [0.0]
        fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True}, layout="constrained")
        cap = RADAR_CAP  # small-sample gains (2x on 4 items) would squash every other line
        for key, row in part.iterrows():
            values = [0.0 if pd.isna(v) else min(v, cap) for v in row.values]
            ax.plot(angles, values + [values[0]], marker="o", ms=3, label=f"{key[1]} {key[2]}{_backend_tag(key[3])}")
        ax.set_xticks(angles[:-1], labels, fontsize=7)
        ax.set_ylim(0, cap)
        _radial_labels_between_spokes(ax, len(labels), cap)
        ax.legend(fontsize=6, loc="upper right", bbox_to_anchor=(1.45, 1.1))
        clipped = " (values above 1.25 drawn at 1.25)" if float(part.max().max()) > cap else ""
        ax.set_title(f"{model}: quality retained per task{clipped}", fontsize=10)
        yield f"abilities_radar_{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}", fig


def long_context(long: pd.DataFrame) -> NamedFigures:
    """Long-context accuracy against context length, one line per KV setting."""
    rows = long[long.metric.str.contains(r"\.acc@\d+", regex=True)].copy()
    if rows.empty:
        return
    rows["length"] = rows.metric.str.extract(r"acc@(\d+)")[0].astype(int)
    rows["entry"] = rows.metric.str.split(".").str[0]
    for entry, part in rows.groupby("entry"):
        fig, ax = plt.subplots(figsize=(5, 3.4), layout="constrained")
        for (bits, method, backend), s in part.groupby(["bits", "method", "backend"]):
            s = s.sort_values("length")
            ax.errorbar(
                s["length"],
                s["value"],
                yerr=pd.to_numeric(s["stderr"], errors="coerce"),
                marker="o",
                capsize=3,
                label=f"{bits} {method}{_backend_tag(backend)}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
        ax.set_title(f"{entry}: accuracy vs context length")
        yield f"long_context_{entry}", fig


def dialogue(long: pd.DataFrame) -> NamedFigures:
    """Dialogue degeneration metrics against bit-width, one panel per tensor type."""
    names = ("degeneration", "rep4", "sentence_rep", "nonword")
    rows = long[long.metric.str.split(".").str[-1].isin(names)].copy()
    if rows.empty:
        return
    rows["bit_width"] = [bit_width(t, b) for t, b in zip(rows.tensor_type, rows.bits)]
    rows["name"] = rows.metric.str.split(".").str[-1]
    types = sorted(set(rows.tensor_type) - {"FP"}, key=lambda t: TT_ORDER.get(t, 9))
    if not types:
        return
    fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.2), squeeze=False, layout="constrained")
    for ax, tt in zip(axes.flat, types):
        part = rows[rows.tensor_type.isin([tt, "FP"])]
        for name, s in part.groupby("name"):
            s = s.groupby("bit_width")["value"].mean().sort_index()
            ax.plot(s.index, s.values, marker="o", label=name)
        ax.set_title(tt)
        ax.set_xlabel("bits")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("dialogue degeneration vs bit-width (higher = more repetition / non-words)")
    yield "dialogue_vs_bits", fig


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated by another with less-or-equal ``x`` and greater-or-equal ``y``."""
    keep = []
    for i, p in points.iterrows():
        dominated = ((points[x] <= p[x]) & (points[y] >= p[y]) & ((points[x] < p[x]) | (points[y] > p[y]))).any()
        if not dominated:
            keep.append(i)
    return points.loc[keep].sort_values(x)


def quality_vs_memory(families: pd.DataFrame) -> NamedFigures:
    """Mean quality retained over families against weight bits per parameter, Pareto front marked."""
    points = families.mean(axis=1).rename("retained").reset_index()
    points["weight_bits"] = [weight_bits_per_param(b) for b in points.bits]
    points = points.dropna(subset=["retained"])
    if points.empty:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for tt, s in points.groupby("tensor_type"):
        ax.scatter(s.weight_bits, s.retained, label=tt, s=22)
    front = pareto_front(points, "weight_bits", "retained")
    ax.plot(front.weight_bits, front.retained, color="black", lw=1, ls="--", label="Pareto front")
    for r in front.itertuples():
        ax.annotate(
            f"{r.quant} {r.method}", (r.weight_bits, r.retained), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("weight memory (bits per weight, with group scales)")
    ax.set_ylabel("quality retained (mean over families)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("quality vs memory")
    yield "quality_vs_memory", fig


def quality_vs_latency(families: pd.DataFrame, efficiency: pd.DataFrame | None) -> NamedFigures:
    """Mean quality retained against measured real-kernel latency (efficiency records of the same
    model, preset and method), one panel per timed point, Pareto front marked."""
    if efficiency is None or efficiency.empty:
        return
    quality = families.mean(axis=1).rename("retained").reset_index()
    # prefer the real-kernel cell's quality when the sweep has one
    quality = quality.sort_values("backend", key=lambda b: b != "vllm").drop_duplicates(["model", "quant", "method"])
    points = efficiency.merge(quality[["model", "quant", "method", "retained"]], on=["model", "quant", "method"])
    if points.empty:
        return
    grid = points[["batch", "input_len"]].drop_duplicates().sort_values(["batch", "input_len"])
    cols = min(3, len(grid))
    rows = math.ceil(len(grid) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax, (batch, length) in zip(axes.flat, grid.itertuples(index=False)):
        p = points[(points.batch == batch) & (points.input_len == length)]
        ax.scatter(p.e2e_s, p.retained, s=22)
        front = pareto_front(p.rename(columns={"e2e_s": "latency"}), "latency", "retained")
        ax.plot(front.latency, front.retained, color="black", lw=1, ls="--")
        for r in p.itertuples():
            ax.annotate(f"{r.quant}", (r.e2e_s, r.retained), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"batch {batch}, input {length}", fontsize=9)
        ax.set_xlabel("end-to-end latency (s)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(grid) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("quality retained")
    fig.suptitle("quality vs real-kernel latency (dashed: Pareto front)")
    yield "quality_vs_latency", fig


def divergence_vs_bits(divergence: pd.DataFrame | None) -> NamedFigures:
    """Per perplexity corpus: mean KL divergence from the FP model (log scale, error bars of
    one SE) and top-1 agreement against bit-width, one line per tensor type and method: the
    label-free damage measures, side by side."""
    if divergence is None or divergence.empty:
        return
    rows = divergence.dropna(subset=["kld"]).copy()
    rows = rows[rows.tensor_type != "FP"]
    if rows.empty:
        return
    rows["bit_width"] = [bit_width(t, b) for t, b in zip(rows.tensor_type, rows.bits)]
    # WA cells vary two widths: one line per activation width (W8A8 and W4A8 on the A8 line)
    rows["series"] = [
        f"WA (A{m.group(1)})" if t == "WA" and (m := re.search(r"A(\d+)", b)) else t
        for t, b in zip(rows.tensor_type, rows.bits)
    ]
    for (model, task), part in rows.groupby(["model", "task"]):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4), layout="constrained")
        for (series, _tt, method, backend), s in sorted(
            part.groupby(["series", "tensor_type", "method", "backend"]),
            key=lambda kv: (TT_ORDER.get(kv[0][1], 9), kv[0]),
        ):
            s = s.groupby("bit_width").first().sort_index()
            label = f"{series} {method}{_backend_tag(backend)}"
            err = pd.to_numeric(s["kld_stderr"], errors="coerce")
            left.errorbar(s.index, s["kld"], yerr=err, marker="o", capsize=3, label=label)
            right.errorbar(
                s.index,
                s["top1_agree"],
                yerr=pd.to_numeric(s["top1_agree_stderr"], errors="coerce"),
                marker="o",
                capsize=3,
                label=label,
            )
        widths = sorted(part.bit_width.unique())
        for ax in (left, right):
            ax.set_xticks(widths, [f"{w:g}" for w in widths])
            ax.set_xlabel("bits (weights; KV for KV cells)")
            ax.grid(alpha=0.3)
        left.set_yscale("log")
        left.set_ylabel("mean KL(FP || quantized), nats")
        right.set_ylabel("top-1 agreement with FP")
        right.set_ylim(top=1.0)
        left.legend(fontsize=7)
        left.set_title("KL divergence per token", fontsize=10)
        right.set_title("same most likely next token", fontsize=10)
        fig.suptitle(f"{model} on {task}: damage measured against the unquantized model")
        yield f"divergence_{re.sub(r'[^A-Za-z0-9_.-]', '_', f'{model}_{task}')}", fig


def all_figures(
    long: pd.DataFrame,
    families: pd.DataFrame,
    efficiency: pd.DataFrame | None = None,
    divergence: pd.DataFrame | None = None,
) -> NamedFigures:
    """Every figure that applies to this sweep, in the report's order."""
    yield from divergence_vs_bits(divergence)
    for draw in (score_vs_bits, method_bars, heatmap, ability_profiles, long_context, dialogue):
        yield from draw(long)
    yield from family_profiles(families)
    yield from quality_vs_memory(families)
    yield from quality_vs_latency(families, efficiency)
