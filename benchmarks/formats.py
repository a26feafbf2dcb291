"""Integer vs microscaling formats, with and without rotation; HQQ and SpinQuant beside them.

Runs the issue-20 grid on one model as one qeval sweep (four invocations into the same sweep
folder, so shared cells are computed once) and prints perplexity, KL divergence from the
unquantized model and quantization time from its result store:

    python benchmarks/formats.py --model smollm2-135m
    python benchmarks/formats.py --model qwen2.5-0.5b --windows 2 --small   # a 4x costlier model

Every cell is WikiText-2 perplexity over ``--windows`` x 2048 tokens with the paired measures
(KLD, top-1 agreement) against the FP model's cached distributions; calibration is the default
16 x 512 tokens of WikiText-2 train.  ``--skip-qeval`` only prints the tables of an earlier run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

from qeval.results import iter_records

#: (quant presets or overrides, methods): the grid, in the order it is run
GRID = [
    ("quant=fp16,w4a16-nvfp4,w4a16-mxfp4,w4a4-nvfp4,w4a4-mxfp4,w8a8-mxfp8,w4a4,kv4-nvfp4,kv4", "rtn,gptq"),
    ("quant=w4g128 quant.w.group_size=16,32,128", "rtn,gptq,hqq,quarot,quarot_gptq"),
    ("quant=w4a16-nvfp4,w4a16-mxfp4,w4a4-nvfp4,w4a4-mxfp4,w4a4", "quarot,quarot_gptq,spinquant,[spinquant,gptq]"),
    ("quant=w3g128,w2g64", "rtn,gptq,hqq"),
]
#: the reduced grid of --small (a costlier model): the formats with RTN and GPTQ, integer groups
#: with HQQ, W4A4 with and without rotation
SMALL_GRID = [
    ("quant=fp16,w4a16-nvfp4,w4a16-mxfp4,w8a8-fp8-block", "rtn,gptq"),
    ("quant=w4g128 quant.w.group_size=32,128", "rtn,gptq,hqq"),
    ("quant=w4a4-nvfp4,w4a4-mxfp4,w4a4", "rtn,quarot"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=6, help="2048-token WikiText-2 windows per cell")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--sweep-name", default=None)
    parser.add_argument("--small", action="store_true", help="the reduced grid")
    parser.add_argument("--skip-qeval", action="store_true", help="only print the tables of an earlier run")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides (after --)")
    args = parser.parse_args()
    sweep = args.sweep_name or f"formats-{args.model}"
    if not args.skip_qeval:
        for quants, methods in SMALL_GRID if args.small else GRID:
            cmd = [
                sys.executable,
                "-m",
                "qeval.cli",
                "-m",
                f"model={args.model}",
                *quants.split(),
                f"method={methods}",
                "suite=quick",
                f"suite.tasks.wikitext2.max_windows={args.windows}",
                f"results_dir={args.results_dir}",
                f"sweep_name={sweep}",
                *args.extra,
            ]
            print("running:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=False)
    print_tables(Path(args.results_dir) / sweep, args.model)


def print_tables(sweep_dir: Path, model: str) -> None:
    """Perplexity, KLD and quantization-time tables (label x method) of ``sweep_dir``."""
    rows = []
    for rec in iter_records(sweep_dir):
        cell = rec["cell"]
        row = {"bits": cell["bits"], "method": cell["method"], "status": rec["status"]}
        if rec["status"] == "ok":
            wt = rec["metrics"]["wikitext2"]
            row.update(
                ppl=wt["ppl"],
                kld=wt.get("kld"),
                kld_se=wt.get("kld_stderr"),
                tokens=wt.get("tokens"),
                quantize_s=rec["timings"].get("quantize"),
            )
        else:
            row["reason"] = rec.get("reason", "")[:90]
        rows.append(row)
    if not rows:
        print(f"\nno cells in {sweep_dir}")
        return
    df = pd.DataFrame(rows)
    ok = df[df.status == "ok"]
    tokens = int(ok.tokens.max()) if len(ok) else 0
    for title, value, fmt in (
        (f"WikiText-2 perplexity ({model}, {tokens:,} predicted tokens)", "ppl", ".2f"),
        ("KL divergence from the unquantized model (nats per token, mean)", "kld", ".4f"),
        ("quantization wall time (s)", "quantize_s", ".1f"),
    ):
        table = ok.pivot_table(index="bits", columns="method", values=value, aggfunc="first")
        print(f"\n{title}\n")
        print(table.to_markdown(floatfmt=fmt))
    skipped = df[df.status != "ok"]
    if len(skipped):
        print("\nnot run\n")
        print(skipped[["bits", "method", "status", "reason"]].to_markdown(index=False))


if __name__ == "__main__":
    main()
