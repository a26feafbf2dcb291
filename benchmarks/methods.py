"""Compare quantization methods on one model: WikiText-2 perplexity and quantization time.

Runs one qeval sweep (methods x specs; cells a method does not support are
recorded as skipped) and prints a table from its result store:

    python benchmarks/methods.py --model smollm2-135m --windows 4 \\
        --methods rtn,gptq,awq,omniquant,smoothquant,quarot,quarot_gptq \\
        --quants w4g128,w3g128,w2g64,w8a8,w6a6,w4a4

Calibration is the ``calib`` config (default: 16 x 512 tokens of WikiText-2 train;
``--calib-samples 128`` for the papers' 128).  Extra Hydra overrides can follow ``--``.

``--llmcompressor gptq_w4,awq_w4,sq_w8a8,rtn_w8a8`` also quantizes the same model with
llm-compressor (same calibration windows, same perplexity windows) and prints its rows next to
qeval's.  llm-compressor pins compressed-tensors and transformers versions that cannot share
qeval's environment, so it runs in its own virtual environment, created on first use under
``~/.cache/qeval/venvs/`` (``--llmcompressor-venv``; it reuses this interpreter's torch through
``--system-site-packages`` and pip-installs only llm-compressor and its pins).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from qeval.results import iter_records

LLMCOMPRESSOR_VERSION = "0.14.0.1"
ONESHOT_SCRIPT = Path(__file__).resolve().parent / "llmcompressor_oneshot.py"


def ensure_llmcompressor_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing llm-compressor if needed."""
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True).returncode == 0
    ):
        return python
    print(f"creating {venv} with llmcompressor=={LLMCOMPRESSOR_VERSION} (one time)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", f"llmcompressor=={LLMCOMPRESSOR_VERSION}"], check=True)
    return python


def converted_model_dir(model: str) -> str:
    """The Hugging Face folder qeval evaluates for ``model=<model>`` (converting a GGUF once)."""
    from hydra import compose, initialize_config_dir

    from qeval.cli import CONF_DIR
    from qeval.models.loading import resolve_pretrained_path

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"model={model}"])
    return resolve_pretrained_path(cfg.model, cfg.cache_dir)


def run_llmcompressor(args: argparse.Namespace) -> list[dict]:
    """One row per llm-compressor recipe, each in a fresh process of the separate venv."""
    python = ensure_llmcompressor_venv(Path(args.llmcompressor_venv).expanduser())
    model_dir = converted_model_dir(args.model)
    rows = []
    for recipe in args.llmcompressor.split(","):
        cmd = [
            str(python),
            str(ONESHOT_SCRIPT),
            "--model-dir",
            model_dir,
            "--recipe",
            recipe,
            "--nsamples",
            str(args.calib_samples),
            "--seqlen",
            "512",
            "--windows",
            str(args.windows),
            "--group-size",
            str(args.llmcompressor_group_size),
        ]
        print("running:", " ".join(cmd), flush=True)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ONESHOT_SCRIPT.parent.parent)}
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append({"recipe": recipe, "status": f"failed (exit {proc.returncode})"})
            continue
        rows.append({**json.loads(lines[-1][len("RESULT ") :]), "status": "ok"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rtn,gptq,awq,omniquant,smoothquant,quarot,quarot_gptq")
    parser.add_argument("--quants", default="w4g128,w3g128,w2g64,w8a8,w6a6,w4a4")
    parser.add_argument("--windows", type=int, default=4, help="2048-token WikiText-2 windows per cell")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--sweep-name", default=None)
    parser.add_argument(
        "--llmcompressor",
        default=None,
        help="comma-separated llm-compressor recipes to run as well (gptq_w4, gptq_w4_sym, awq_w4, sq_w8a8, rtn_w8a8)",
    )
    parser.add_argument(
        "--llmcompressor-group-size",
        type=int,
        default=128,
        help="group size of llm-compressor's W4 recipes (it needs in_features %% group == 0)",
    )
    parser.add_argument("--llmcompressor-venv", default=f"~/.cache/qeval/venvs/llmcompressor-{LLMCOMPRESSOR_VERSION}")
    parser.add_argument("--skip-qeval", action="store_true", help="only print the table of an earlier run")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides (after --)")
    args = parser.parse_args()
    sweep = args.sweep_name or f"methods-{args.model}"
    cmd = [
        sys.executable,
        "-m",
        "qeval.cli",
        "-m",
        f"model={args.model}",
        f"method={args.methods}",
        f"quant={args.quants}",
        "suite=nlp-full",
        "~suite.tasks.lambada",
        f"suite.tasks.wikitext2.max_windows={args.windows}",
        f"calib.nsamples={args.calib_samples}",
        f"results_dir={args.results_dir}",
        f"sweep_name={sweep}",
        *args.extra,
    ]
    if not args.skip_qeval:
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)

    print_qeval_tables(Path(args.results_dir) / sweep, args)
    if args.llmcompressor:
        lc = pd.DataFrame(run_llmcompressor(args))
        print(f"\nllm-compressor {LLMCOMPRESSOR_VERSION} (same calibration and windows)\n")
        print(lc.to_markdown(index=False, floatfmt=".2f"))


def print_qeval_tables(sweep_dir: Path, args: argparse.Namespace) -> None:
    """Perplexity and quantization-time tables (quant x method) of the cells stored in ``sweep_dir``."""
    rows = []
    for rec in iter_records(sweep_dir):
        cell = rec["cell"]
        row = {"quant": cell["quant"], "method": cell["method"], "status": rec["status"]}
        if rec["status"] == "ok":
            wt = rec["metrics"]["wikitext2"]
            row.update(ppl=wt["ppl"], windows=wt["windows"], quantize_s=rec["timings"].get("quantize"))
        else:
            row["reason"] = rec.get("reason", "")[:60]
        rows.append(row)
    if not rows:
        print(f"\nno qeval cells in {sweep_dir}")
        return
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
