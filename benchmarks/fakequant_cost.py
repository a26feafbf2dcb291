"""What fake quantization costs at evaluation time: forward-pass time of quantized specs
relative to the unquantized model, on the same windows.

    python benchmarks/fakequant_cost.py --model smollm2-135m --quants fp16,w4g128,w8a8,w4a4,kv4 \\
        --seqlen 2048 --windows 2 --repeats 3

Weight-only specs cost nothing at run time (weights are dequantized once); activation and KV
quantization run on every forward, so their ratio is the overhead a sweep pays per cell.
Prints a table: median seconds per window (after one warm-up window) and the ratio to fp16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quants", default="fp16,w4g128,w8a8,w4a4,kv4")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import pandas as pd

    from qeval.cli import compose_config
    from qeval.data import tokenized_corpus
    from qeval.eval.perplexity import corpus_windows
    from qeval.models.loading import load_model
    from qeval.quant.apply import quantize_model
    from qeval.quant.recipe import get_method

    rows = []
    for quant in args.quants.split(","):
        cfg = compose_config([f"model={args.model}", f"quant={quant}"])
        loaded = load_model(cfg.model, cfg.cache_dir)
        model = loaded.fresh_copy()
        quantize_model(model, cfg.quant, get_method("rtn", {}))
        ids = tokenized_corpus(loaded.tokenizer, "wikitext2", cfg.data_dir)
        windows = [w.unsqueeze(0) for w in corpus_windows(ids, args.seqlen, args.windows + 1)]
        with torch.no_grad():
            model(windows[0])  # warm-up
            times = []
            for _ in range(args.repeats):
                for w in windows[1:]:
                    t0 = time.perf_counter()
                    model(w)
                    times.append(time.perf_counter() - t0)
        rows.append({"quant": quant, "s_per_window": statistics.median(times)})
        print(f"{quant}: {rows[-1]['s_per_window']:.3f} s per {args.seqlen}-token window", flush=True)
        del model
    table = pd.DataFrame(rows)
    base = table.loc[table.quant == "fp16", "s_per_window"]
    if not base.empty:
        table["ratio_to_fp16"] = table["s_per_window"] / float(base.iloc[0])
    print(
        f"\n{args.model}, {args.seqlen}-token windows, median of {args.repeats} x {args.windows}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(table.to_markdown(index=False, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
