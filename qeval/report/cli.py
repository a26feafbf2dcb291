"""``qeval-report RESULTS_DIR``: print and write the sweep's tables, verdicts and report.

Verdicts are recomputed from the cells' per-item files every time, so an old sweep can be
re-judged with another ``--keep``, ``--alpha`` or ``--correction`` without rerunning it."""

from __future__ import annotations

import argparse
import sys

from qeval.report.write import write_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qeval-report", description=__doc__)
    parser.add_argument(
        "results_dirs",
        nargs="+",
        metavar="RESULTS_DIR",
        help="one or more sweep folders, e.g. results/rtn results/gptq (compared together)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: plots/<sweep>[+<sweep>...])")
    parser.add_argument(
        "--ppl-rtol",
        type=float,
        default=0.01,
        help="fake vs real kernels: largest relative perplexity difference that agrees (0.01)",
    )
    parser.add_argument(
        "--n-se",
        type=float,
        default=2.0,
        help="fake vs real kernels: largest accuracy difference in standard errors (2)",
    )
    parser.add_argument(
        "--keep",
        type=float,
        default=0.98,
        help="recommendations: share of the unquantized quality to keep (0.98; also report.keep=0.95)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.05, help="verdicts: significance level after correction (0.05)"
    )
    parser.add_argument(
        "--correction",
        choices=("bh", "holm", "none"),
        default="bh",
        help="verdicts: multiple-comparison correction over the report's comparisons "
        "(bh = Benjamini-Hochberg false-discovery rate, the default; holm = family-wise)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for arg in argv for a in (["--keep", arg.split("=", 1)[1]] if arg.startswith("report.keep=") else [arg])]
    args = parser.parse_args(argv)
    if not 0 < args.keep <= 1:
        parser.error(f"invalid value report.keep={args.keep}: allowed a share in (0, 1]")
    if not 0 < args.alpha < 1:
        parser.error(f"invalid value --alpha={args.alpha}: allowed a probability in (0, 1)")
    try:
        markdown, files = write_tables(
            args.results_dirs, args.out, args.ppl_rtol, args.n_se, args.keep, args.alpha, args.correction
        )
    except ValueError as err:
        print(f"qeval-report: {err}", file=sys.stderr)
        return 2
    print(markdown)
    print("\nwrote " + ", ".join(map(str, files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
