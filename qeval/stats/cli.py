"""``qeval-stats model=... [calib.nsamples=...]``: per-layer tensor statistics and their plots.

Takes the same config overrides as ``qeval`` (model, calib, results_dir, cache_dir), runs the
unquantized model on the calibration set, and writes one record to
``<results_dir>/stats/`` and figures to ``plots/stats/<model>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

KIND_ORDER = ["weight", "activation", "key", "value"]


def plot_stats(frame: pd.DataFrame, out: Path, title: str) -> list[Path]:
    """Per-layer lines per tensor kind (absmax, kurtosis, outlier share) and the distribution
    of per-module values per kind (the study's 'why activations are harder' view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qeval.report.write import save_figure

    files = []
    kinds = [k for k in KIND_ORDER if k in set(frame.kind)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, stat in zip(axes, ("absmax", "kurtosis", "outlier_share")):
        for kind in kinds:
            per_layer = frame[frame.kind == kind].groupby("layer")[stat].max()
            ax.plot(per_layer.index, per_layer.values, marker=".", label=kind)
        ax.set_title(f"{stat} (max over a layer's modules)")
        ax.set_xlabel("layer")
        if stat != "outlier_share":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    files.append(save_figure(fig, out, "stats_by_layer"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, stat in zip(axes, ("absmax", "kurtosis")):
        ax.boxplot([frame[frame.kind == k][stat].values for k in kinds], tick_labels=kinds)
        ax.set_yscale("log")
        ax.set_title(f"{stat} of every module, per tensor kind")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    files.append(save_figure(fig, out, "stats_by_kind"))
    return files


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qeval.cell import build_cell
    from qeval.config import ConfigError
    from qeval.data import calibration_for, check_available
    from qeval.models.adapters import get_adapter
    from qeval.models.loading import load_model
    from qeval.results import SCHEMA_VERSION, ResultStore, stable_hash
    from qeval.stats.tensors import OUTLIER_FACTOR, collect

    try:
        from qeval.cli import compose_config

        cfg = build_cell(compose_config(overrides))
        check_available(cfg.calib.dataset, cfg.data_dir)
    except (ConfigError, ValueError) as err:
        print(f"qeval-stats: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors name the bad override
        print(f"qeval-stats: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    loaded = load_model(cfg.model, cfg.cache_dir)
    adapter = get_adapter(loaded.model, "qeval-stats")
    batches = calibration_for(cfg, loaded.tokenizer)
    rows = collect(loaded.model, batches, adapter.blocks)
    identity = {"model": dataclasses.asdict(cfg.model), "calib": dataclasses.asdict(cfg.calib)}
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": "tensor_stats",
        "status": "ok",
        "label": f"stats__{cfg.model.name}",
        "hash": stable_hash(identity),
        "identity": identity,
        "model_fingerprint": loaded.fingerprint,
        "outlier_factor": OUTLIER_FACTOR,
        "rows": rows,
    }
    path = ResultStore(cfg.results_dir, "stats").write(record)
    frame = pd.DataFrame(rows)
    by_kind = frame.groupby("kind")
    summary = by_kind[["absmax", "std", "kurtosis", "channel_absmax_ratio"]].median()
    summary["outlier_share_mean"] = by_kind["outlier_share"].mean()
    summary = summary.loc[[k for k in KIND_ORDER if k in summary.index]]
    out = Path("plots") / "stats" / cfg.model.name
    files = plot_stats(
        frame,
        out,
        f"{cfg.model.name}: tensor statistics ({cfg.calib.nsamples} x {cfg.calib.seqlen} calibration tokens)",
    )
    frame.to_csv(out / "stats.csv", index=False)
    summary.to_csv(out / "stats_summary.csv")
    print(
        f"median over modules and layers; outlier share: mean share of channels whose max exceeds "
        f"{OUTLIER_FACTOR:g} x the median channel's\n"
    )
    print(summary.to_markdown(floatfmt=".4g"))
    print(f"\nrecord: {path}\nfiles: {', '.join(str(f) for f in [out / 'stats.csv', *files])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
