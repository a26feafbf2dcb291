"""An MoE model at real layer shapes, end to end: W4g128 RTN and GPTQ with the coverage account.

No Mixture-of-Experts checkpoint could be had offline (no PyPI package carries one, the Hub is
unreachable), so this builds a *random-weight* model with the layer shapes of IBM's
granite-3.0-1b-a400m (granitemoe: hidden 1024, 24 layers, 16 query / 8 KV heads of 64, 32
experts of width 512 with 8 routed per token, vocabulary 49155; 1.3 B parameters, 1.2 B of them
in the experts), saves it as a local folder with SmolLM2's tokenizer (ids below 49152), and runs
the sweep a user would:

    qeval -m model=local model.path=<folder> quant=fp16,w4g128 method=rtn,gptq suite=tiny-ppl ...

It prints, per cell, its status, the share of eligible weights quantized, the experts' share,
how many experts GPTQ had to round to nearest for lack of routed tokens, and the times.
Perplexities of a random model mean nothing; the point is that every expert weight of a
real-sized MoE is quantized, by both methods, and said so.

    python benchmarks/moe_real_shapes.py --out /tmp/granitemoe-random
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

GRANITE_MOE_1B = dict(
    vocab_size=49155,
    hidden_size=1024,
    intermediate_size=512,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    num_local_experts=32,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    embedding_multiplier=12.0,
    attention_multiplier=0.015625,
    residual_multiplier=0.22,
    logits_scaling=6.0,
)


def build(out: Path, seed: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qeval.cli import compose_config
    from qeval.models.loading import resolve_pretrained_path

    if (out / "config.json").is_file():
        print(f"model folder {out} exists: reusing it")
        return
    config = AutoConfig.for_model("granitemoe", **GRANITE_MOE_1B)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default init (std 0.02) keeps every logit near zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    n = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    print(f"random granitemoe: {n / 1e9:.2f} B parameters, {experts / 1e9:.2f} B in fused experts")
    model.save_pretrained(out)
    smollm = resolve_pretrained_path(compose_config([]).model)  # the default model's tokenizer
    AutoTokenizer.from_pretrained(smollm).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/granitemoe-random"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens")
    args = parser.parse_args()
    build(args.out, args.seed)
    sweep = "moe-real-shapes"
    command = [
        "qeval",
        "-m",
        "model=local",
        f"model.path={args.out}",
        "model.name=granitemoe-1b-random",
        "quant=fp16,w4g128",
        f"method={args.methods}",
        "suite=tiny",
        "~suite.tasks.lambada",
        "suite.tasks.wikitext2.seqlen=512",
        f"calib.nsamples={args.nsamples}",
        f"results_dir={args.results}",
        f"sweep_name={sweep}",
    ]
    print(" ".join(command), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=os.environ.copy())
    print(f"sweep: exit {proc.returncode}, {time.perf_counter() - t0:.0f} s")
    print(
        "\n| cell | status | eligible weights quantized | experts quantized | experts by RTN (too few tokens) | quantize s | total s |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in sorted((args.results / sweep).glob("*.json")):
        rec = json.loads(path.read_text())
        cov = rec.get("coverage") or {}
        experts = (cov.get("kinds") or {}).get("experts") or {}
        total = sum(experts.values())
        share = f"{experts.get('quantized', 0) / total:.1%} of {total:,}" if total else ""
        fallback = str((cov.get("experts") or {}).get("rounded_to_nearest", ""))
        timings = rec.get("timings", {})
        q = timings.get("quantize")
        print(
            f"| {rec['label']} | {rec['status']} | {cov.get('share', '') if cov else ''} | {share} | {fallback} | "
            f"{q if q is None else round(q)} | {round(timings.get('total', 0))} |"
        )
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
