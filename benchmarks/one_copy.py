"""One copy in memory, and nothing lost by it: a sweep run in one process gives exactly the
numbers of its cells run one by one, each in a fresh process; and the sweep's peak resident
memory (the whole process tree, polled) is printed beside the weights' size.

    python benchmarks/one_copy.py                      # SmolLM2, the grid of issue 18
    python benchmarks/one_copy.py --sweep-only         # just the sweep and its peak RSS
    PYTHONPATH=/old/checkout python benchmarks/one_copy.py --sweep-only   # the same, before

Every cell of the sweep is compared metric by metric with the same cell alone (same hash, so
the same identity); a difference prints the metric and both values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_model import TreeRSS  # noqa: E402 - the one process-tree RSS poller of the benchmarks

QUANTS = "fp16,w4g128,w8a8,kv4"
METHODS = "rtn,gptq,awq,smoothquant,quarot"


def qeval(args: list[str]) -> tuple[int, int, float]:
    """Run ``python -m qeval.cli`` with ``args``: (exit code, peak RSS of the tree, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qeval.cli", *args], env=os.environ.copy())
    rss = TreeRSS(proc.pid)
    code = proc.wait()
    return code, rss.stop(), time.perf_counter() - t0


def records(folder: Path) -> dict[str, dict]:
    out = {}
    for path in folder.glob("*.json"):
        rec = json.loads(path.read_text())
        out[rec["hash"]] = rec
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default=QUANTS)
    parser.add_argument("--method", default=METHODS)
    parser.add_argument("--extra", nargs="*", default=["calib.nsamples=8", "calib.seqlen=256"], help="more overrides")
    parser.add_argument("--sweep-only", action="store_true", help="no single-cell runs: the sweep and its peak RSS")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    root = args.results or Path(tempfile.mkdtemp(prefix="qeval-one-copy-"))
    common = [f"model={args.model}", *args.extra]
    code, peak, seconds = qeval(
        ["-m", *common, f"quant={args.quant}", f"method={args.method}", f"results_dir={root / 'sweep'}"]
    )
    sweep = {h: r for h, r in records(root / "sweep" / "default").items()}
    ok = [r for r in sweep.values() if r["status"] == "ok"]
    print(f"sweep: exit {code}, {len(sweep)} cells ({len(ok)} ok), {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    if args.sweep_only:
        sys.exit(code)
    differing, singles_peak = 0, 0
    for rec in sorted(ok, key=lambda r: r["label"]):
        cell = rec["cell"]
        over = [f"quant={cell['quant']}", f"method=[{cell['method'].replace('+', ',')}]"]
        folder = root / f"alone-{rec['label']}"
        c, rss, _s = qeval([*common, *over, f"results_dir={folder}"])
        singles_peak = max(singles_peak, rss)
        alone = records(folder / "default").get(rec["hash"])
        if c != 0 or alone is None:
            print(f"{rec['label']}: single run failed (exit {c})")
            differing += 1
            continue
        for task, metrics in rec["metrics"].items():
            for key, value in metrics.items():
                if alone["metrics"].get(task, {}).get(key) != value:
                    differing += 1
                    print(f"{rec['label']} {task}.{key}: sweep {value!r}, alone {alone['metrics'][task].get(key)!r}")
    compared = sum(len(m) for r in ok for m in r["metrics"].values())
    print(f"{len(ok)} cells, {compared} metrics compared with single-cell runs: {differing} differing")
    print(f"peak RSS: sweep {peak / 2**30:.2f} GiB, largest single-cell run {singles_peak / 2**30:.2f} GiB")
    sys.exit(1 if differing or code else 0)


if __name__ == "__main__":
    main()
