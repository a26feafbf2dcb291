"""What real kernels buy: prefill/decode latency, throughput and memory on vLLM, per format.

For each quant spec the model is quantized by qeval (``--method``, default RTN),
exported as compressed-tensors (qeval.export) and timed by a vLLM engine over a
grid of batch sizes and input lengths (qeval.backends.efficiency has the
definitions).  Records go into the result store (``results/<sweep>/``, kind
``efficiency``) and a table is printed:

    python benchmarks/efficiency.py --model smollm2-135m --quants fp16,w8a8 \\
        --batch 1,8,32 --input-len 128,1024 --output-len 32

On a GPU, time a real-size model without downloading it (random weights; kernel
speed does not depend on their values):

    python benchmarks/efficiency.py --random llama-2-7b --quants fp16,w4g128-sym,w8a8,w8a8-fp8

Formats vLLM cannot serve on this machine are reported and skipped.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
from pathlib import Path

import pandas as pd


def _csv(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x]


def _compose(args: argparse.Namespace, quant: str):
    from qeval.cell import build_cell
    from qeval.cli import compose_config

    overrides = [f"quant={quant}", f"method={args.method}", "backend=vllm"]
    return build_cell(compose_config(overrides + ([f"model={args.model}"] if args.model else [])))


def build_checkpoint(args: argparse.Namespace, quant: str, cache: Path) -> Path:
    """Quantize and export once per (model, quant, method); later runs reuse the folder."""
    import torch

    from qeval.config import quantized
    from qeval.export.compressed_tensors import export_checkpoint, is_complete_export
    from qeval.quant.apply import quantize_model

    cfg = _compose(args, quant)
    name = args.model or f"random-{args.random}"
    out = cache / "exports" / f"efficiency-{name}-{quant}-{args.method}"
    if is_complete_export(out):
        return out
    if args.random:
        from transformers import AutoModelForCausalLM

        from qeval.backends.efficiency import random_checkpoint

        folder = random_checkpoint(args.random, cache / "random" / args.random)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), None
        calibration = None
    else:
        from qeval.data import calibration_for
        from qeval.models.loading import load_model

        loaded = load_model(cfg.model, cfg.cache_dir)
        model, tokenizer = loaded.fresh_copy(), loaded.tokenizer
        calibration = functools.cache(functools.partial(calibration_for, cfg, tokenizer))
    quantize_model(model, cfg.quant, cfg.recipe, calibration)
    kv_calib = calibration() if calibration and quantized(cfg.quant.kv) else None
    path = export_checkpoint(
        model,
        tokenizer,
        cfg.quant,
        out,
        kv_calibration=kv_calib,
        provenance={"benchmark": "efficiency", "model": name, "method": args.method},
    )
    del model
    gc.collect()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a qeval model config (default smollm2-135m)")
    source.add_argument(
        "--random", default=None, help="random weights of a real shape: llama-2-7b, llama-3-8b, or a config.json path"
    )
    parser.add_argument("--quants", default="fp16,w8a8", help="quant presets (fp16 = the float checkpoint)")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--input-len", default="128,1024")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cpu-kv-cache-gib",
        type=int,
        default=4,
        help="CPU only: KV space; must hold max(batch) x (input + output) tokens",
    )
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--sweep-name", default="efficiency")
    args = parser.parse_args(argv)
    if not args.model and not args.random:
        args.model = "smollm2-135m"

    from qeval.backends.efficiency import measure, timings_record
    from qeval.backends.vllm import EngineSettings, VllmEngine, check_kernels, device_type
    from qeval.errors import UnsupportedCellError
    from qeval.export.compressed_tensors import export_scheme
    from qeval.models.carriers import cache_root
    from qeval.results import ResultStore, stable_hash

    batches, lengths = _csv(args.batch, int), _csv(args.input_len, int)
    store = ResultStore(args.results_dir, args.sweep_name)
    device = device_type()
    rows = []
    for quant in _csv(args.quants):
        try:
            scheme = export_scheme(_compose(args, quant).quant)
            check_kernels(scheme, device)
        except UnsupportedCellError as err:
            print(f"{quant}: skipped ({err})", flush=True)
            continue
        checkpoint = build_checkpoint(args, quant, cache_root())
        settings = EngineSettings(
            max_model_len=max(lengths) + args.output_len + 8,
            max_num_seqs=max(batches),
            cpu_kv_cache_gib=args.cpu_kv_cache_gib,
            scheme=scheme,
            prefix_caching=False,
        )  # repeats send the same prompts
        config = json.loads((checkpoint / "config.json").read_text())
        vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 32000)
        with VllmEngine(checkpoint, settings) as engine:
            timings = []
            for batch in batches:
                for length in lengths:
                    t = measure(engine.llm, batch, length, args.output_len, args.repeats, vocab)
                    print(
                        f"{quant}: batch {batch} input {length}: prefill {t.prefill_s:.3f}s, "
                        f"decode {1000 * t.decode_s_per_token:.1f} ms/token, {t.throughput_tok_s:.1f} tok/s",
                        flush=True,
                    )
                    timings.append(t)
            label = f"efficiency__{args.model or 'random-' + args.random}__{quant}__{args.method}"
            record = timings_record(
                label,
                checkpoint,
                engine.kwargs,
                device,
                timings,
                {
                    "quant": quant,
                    "method": args.method,
                    "scheme": scheme.label,
                    "model": args.model or f"random-{args.random}",
                },
            )
        record["hash"] = stable_hash({k: record[k] for k in ("label", "device", "engine", "timings")})
        store.write(record)
        for t in record["timings"]:
            rows.append(
                {
                    "quant": quant,
                    "scheme": scheme.label,
                    "dtype": record["engine"]["dtype"],
                    "weight_MB": record["weight_bytes"] / 2**20,
                    "kv_B/token": record["kv_bytes_per_token"],
                    **t,
                }
            )
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows)
    table["decode_ms/token"] = 1000 * table.pop("decode_s_per_token")
    table = table.drop(columns=["output_len"]).rename(columns={"prefill_s": "prefill_s", "e2e_s": "e2e_s"})
    print(f"\ndevice: {device}; output length {args.output_len}; median of {args.repeats} after a warm-up\n")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    out = Path("plots") / args.sweep_name
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "efficiency.csv", index=False)
    print(f"\nrecords: {store.dir}/  table: {out / 'efficiency.csv'}")
    return 0


if __name__ == "__main__":  # vLLM spawns workers: keep the entry point guarded
    sys.exit(main())
