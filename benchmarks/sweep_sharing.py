"""Sweep sharing: one N-cell ``qeval`` sweep against N separate ``qeval`` invocations of the
same cells.

Inside a sweep the process starts once, the model is loaded once, the data is tokenized
once and every cell is validated up front; a separate invocation pays all of that per
cell.  Two per-cell costs of the sweep are compared with the cells' own work (their
recorded quantize + evaluate seconds):

* marginal: the time from one cell's result to the next one's (cells 2..N: Hydra's job
  set-up, the copy of the model, checks, the record), i.e. what one more cell costs once
  load and preparation are paid -- the figure the sharing is about;
* amortized: the sweep's wall time / N, start-up, planning and the final tables included.

    python benchmarks/sweep_sharing.py --model smollm2-135m \\
        --quants fp16,w8,w4g128,w3g128,w8a8,w4a8,w4a4,kv4,kv3,kv2

Every run writes into a fresh temporary results folder (nothing is reused between the
two arms); the model conversion cache (``~/.cache/qeval``) is warmed before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = [
    "suite=tiny",
    "suite.tasks.wikitext2.seqlen=2048",
    "suite.tasks.wikitext2.max_windows=4",
    "suite.tasks.lambada.limit=100",
    "suite.tasks.lambada.batch_size=16",
]


def qeval(args: list[str]) -> float:
    """Wall seconds of one ``qeval`` command (a fresh process, as a user runs it)."""
    exe = Path(sys.executable).parent / "qeval"
    command = [str(exe) if exe.is_file() else "qeval", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", QEVAL_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def records(results: Path) -> list[dict]:
    out = []
    for path in results.rglob("*.json"):
        if path.name.startswith(".") or ".hydra" in path.parts:
            continue
        out.append(json.loads(path.read_text()))
    return sorted(out, key=lambda r: r["finished_at"])


def work(rec: dict) -> float:
    """A cell's own work: quantize + evaluate seconds."""
    return rec["timings"]["quantize"] + sum(rec["timings"]["eval"].values())


def work_seconds(results: Path) -> dict[str, float]:
    """Per cell (quant preset): the recorded quantize + evaluate seconds."""
    return {rec["cell"]["quant"]: work(rec) for rec in records(results)}


def marginal_seconds(results: Path) -> dict[str, float]:
    """Per cell after the first: seconds from the previous cell's result to this one's."""
    recs = records(results)
    return {b["cell"]["quant"]: b["finished_at"] - a["finished_at"] for a, b in zip(recs, recs[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quants", default="fp16,w8,w4g128,w3g128,w8a8,w4a8,w4a4,kv4,kv3,kv2")
    parser.add_argument("--method", default="rtn")
    args = parser.parse_args()
    quants = args.quants.split(",")
    common = [f"model={args.model}", f"method={args.method}", *SUITE, "sweep_name=sharing"]
    with tempfile.TemporaryDirectory(prefix="qeval-sharing-") as tmp:
        root = Path(tmp)
        qeval(common + ["quant=fp16", f"results_dir={root / 'warm'}"])  # model conversion, caches: untimed
        sweep_s = qeval(common + [f"quant={','.join(quants)}", f"results_dir={root / 'sweep'}"])
        sweep_work = work_seconds(root / "sweep")
        marginal = marginal_seconds(root / "sweep")
        separate_s, separate_work = {}, {}
        for q in quants:
            separate_s[q] = qeval(common + [f"quant={q}", f"results_dir={root / 'separate' / q}"])
            separate_work.update(work_seconds(root / "separate" / q))
    n = len(quants)
    print(f"\nmodel {args.model}, method {args.method}, {n} cells, suite: {' '.join(SUITE)}\n")
    print(
        "| cell | in the sweep: quantize + evaluate (s) | in the sweep: marginal cost (s) | ratio "
        "| separate invocation: wall (s) | its quantize + evaluate (s) |"
    )
    print("|---|---|---|---|---|---|")
    for q in quants:
        m = marginal.get(q)
        cost = f"{m:.1f} | {m / sweep_work[q]:.3f}" if m is not None else "(first: pays the load) | "
        print(f"| {q} | {sweep_work[q]:.1f} | {cost} | {separate_s[q]:.1f} | {separate_work[q]:.1f} |")
    later = [q for q in quants if q in marginal]
    marginal_ratio = sum(marginal[q] for q in later) / sum(sweep_work[q] for q in later)
    per_cell = sweep_s / n
    separate_mean = statistics.mean(separate_s.values())
    print(f"\nsweep, marginal: cells 2..{n} cost {marginal_ratio:.3f} x their quantize + evaluate time (target <= 1.1)")
    print(
        f"sweep, amortized: {sweep_s:.1f} s wall for {n} cells = {per_cell:.1f} s per cell = "
        f"{per_cell / statistics.mean(sweep_work.values()):.3f} x the mean quantize + evaluate time"
    )
    print(
        f"separate invocations: {sum(separate_s.values()):.1f} s wall = {separate_mean:.1f} s per cell = "
        f"{separate_mean / statistics.mean(separate_work.values()):.3f} x; the sweep saves "
        f"{1 - sweep_s / sum(separate_s.values()):.0%} of the wall time"
    )


if __name__ == "__main__":
    main()
