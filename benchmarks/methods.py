"""Compare quantization methods on one model: WikiText-2 perplexity and quantization time.

Runs one qeval sweep (methods x specs; cells a method does not support are
recorded as skipped) and prints a table from its result store:

    python benchmarks/methods.py --model smollm2-135m --windows 4 \\
        --methods rtn,gptq,awq,omniquant,smoothquant,quarot,quarot_gptq \\
        --quants w4g128,w3g128,w2g64,w8a8,w6a6,w4a4

Calibration is the ``calib`` config (default: 16 x 512 tokens of WikiText-2 train;
``--calib-samples 128`` for the papers' 128).  Extra Hydra overrides can follow ``--``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

from qeval.results import iter_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rtn,gptq,awq,omniquant,smoothquant,quarot,quarot_gptq")
    parser.add_argument("--quants", default="w4g128,w3g128,w2g64,w8a8,w6a6,w4a4")
    parser.add_argument("--windows", type=int, default=4, help="2048-token WikiText-2 windows per cell")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--sweep-name", default=None)
    parser.add_argument("extra", nargs="*", help="more Hydra overrides (after --)")
    args = parser.parse_args()
    sweep = args.sweep_name or f"methods-{args.model}"
    cmd = [sys.executable, "-m", "qeval.cli", "-m", f"model={args.model}", f"method={args.methods}",
           f"quant={args.quants}", "~suite.tasks.lambada", f"suite.tasks.wikitext2.max_windows={args.windows}",
           f"calib.nsamples={args.calib_samples}", f"results_dir={args.results_dir}", f"sweep_name={sweep}",
           *args.extra]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)

    rows = []
    for rec in iter_records(Path(args.results_dir) / sweep):
        cell = rec["cell"]
        row = {"quant": cell["quant"], "method": cell["method"], "status": rec["status"]}
        if rec["status"] == "ok":
            wt = rec["metrics"]["wikitext2"]
            row.update(ppl=wt["ppl"], windows=wt["windows"], quantize_s=rec["timings"].get("quantize"))
        else:
            row["reason"] = rec.get("reason", "")[:60]
        rows.append(row)
    df = pd.DataFrame(rows)
    ok = df[df.status == "ok"]
    table = ok.pivot_table(index="quant", columns="method", values="ppl", aggfunc="first")
    times = ok.pivot_table(index="quant", columns="method", values="quantize_s", aggfunc="first")
    print(f"\nWikiText-2 perplexity ({args.model}, {args.windows} windows x 2048 tokens)\n")
    print(table.to_markdown(floatfmt=".2f"))
    print("\nquantization wall time (s)\n")
    print(times.to_markdown(floatfmt=".1f"))
    skipped = df[df.status != "ok"]
    if len(skipped):
        print("\nnot run\n")
        print(skipped[["quant", "method", "status", "reason"]].to_markdown(index=False))


if __name__ == "__main__":
    main()
