"""How close the stored FP reference (top-k log-probabilities, one rest bucket, m draws from the
rest) brings the KL divergence to the full-vocabulary one, and what the comparison costs in a
perplexity pass.

    PYTHONPATH=. QEVAL_DATA_DIR=../shared/data python benchmarks/kld_truncation.py \\
        --model smollm2-135m --quants w8,w4g128,w3g128,kv4,kv3,kv2 --windows 2 --seqlen 2048 --ks 8,16,32,64

For every spec (RTN; weights and KV both through ``quantize_model``) and every WikiText-2 window,
the quantized model's logits are compared with the unquantized model's over the whole vocabulary
(float32 terms, float64 sums) and through ``qeval.eval.divergence`` for every k: the top-k + rest
bucket lower bound, and the estimate with ``--tail-samples`` draws from the rest (float16
reference, as cached; and float32 at the default k, to show the storage error).  The reported
numbers (``kld``, ``kld_stderr``, ``top1_agree``) come from ``perplexity(...)`` itself, reading
the reference the FP cell wrote (``is_reference=True``) from a temporary cache.

Prints: per spec the perplexity, full and reported KLD, top-1 agreement and percentiles; the
relative error of the mean KLD per k; the acceptance checks; the cache's size per window; and the
time of perplexity passes with the comparison against plain ones (same windows, same run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F


def full_kld(p_logits: torch.Tensor, q_logits: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """KL(P || Q) per position over the whole vocabulary (float32 terms, float64 sums)."""
    out = []
    for start in range(0, p_logits.shape[0], rows):
        lp = F.log_softmax(p_logits[start : start + rows].float(), dim=-1)
        lq = F.log_softmax(q_logits[start : start + rows].float(), dim=-1)
        out.append(F.kl_div(lq, lp, log_target=True, reduction="none").double().sum(-1))
    return torch.cat(out)


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _race(plain, other, repeats: int) -> dict[str, float]:
    """Minimum wall and CPU seconds of each of two passes run alternately ``repeats`` times (a
    shared machine's load only ever adds time, so the minimum is the least disturbed value; CPU
    time counts this process only)."""
    a, b = [], []
    for _ in range(repeats):
        a.append(_timed(plain)[1:])
        b.append(_timed(other)[1:])
    return {
        "plain_s": min(x[0] for x in a),
        "with_kld_s": min(x[0] for x in b),
        "plain_cpu_s": min(x[1] for x in a),
        "with_kld_cpu_s": min(x[1] for x in b),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quants", default="w8,w4g128,w3g128,kv4,kv3,kv2")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--ks", default="8,16,32,64")
    parser.add_argument("--tail-samples", type=int, default=None, help="m (default: DEFAULT_TAIL_SAMPLES)")
    parser.add_argument("--timing-quants", default="w4g128,kv4", help="cells timed plain vs with the comparison")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes of each kind (interleaved; the minimum counts)"
    )
    args = parser.parse_args(argv)

    import pandas as pd

    from qeval.cell import build_cell
    from qeval.cli import compose_config
    from qeval.data import tokenized_corpus
    from qeval.eval import divergence as dv
    from qeval.eval.perplexity import corpus_windows, perplexity
    from qeval.eval.scorer import iter_next_token_logits
    from qeval.models.loading import load_model
    from qeval.quant.apply import quantize_model
    from qeval.quant.recipe import get_method

    ks = [int(k) for k in args.ks.split(",")]
    k0, m = dv.DEFAULT_TOP_K, args.tail_samples if args.tail_samples is not None else dv.DEFAULT_TAIL_SAMPLES
    cfg = compose_config([f"model={args.model}"])
    loaded = load_model(cfg.model, cfg.cache_dir)
    fp, tok = loaded.model, loaded.tokenizer
    windows = corpus_windows(tokenized_corpus(tok, args.dataset, cfg.data_dir), args.seqlen, args.windows)
    ppl_args = (tok, args.dataset, args.seqlen, args.windows, cfg.data_dir)
    kld_args = {"reference_cache_dir": Path(tempfile.mkdtemp(prefix="qeval-kld-")), "reference_key": loaded.fingerprint}
    kld_args |= {"top_k": k0, "tail_samples": m}

    # the FP model: full logits for the exact KLD, references for every k (seeded as perplexity seeds them)
    fp_logits = list(iter_next_token_logits(fp, windows, "FP logits"))
    variants = [(k, torch.float16) for k in ks] + [(k0, torch.float32)]
    refs = {
        (k, dt): [
            dv.reference_from_logits(lg, w[1:], k, m, seed=i, dtype=dt)
            for i, (lg, w) in enumerate(zip(fp_logits, windows))
        ]
        for k, dt in variants
    }
    fp_plain = perplexity(fp, *ppl_args)
    fp_own = perplexity(fp, *ppl_args, is_reference=True, **kld_args)
    assert fp_own.ppl == fp_plain.ppl and fp_own.divergence["kld"] == 0 and fp_own.divergence["top1_agree"] == 1
    (cache_file,) = kld_args["reference_cache_dir"].glob("*.npz")
    fp_race = _race(
        lambda: perplexity(fp, *ppl_args),
        lambda: perplexity(fp, *ppl_args, is_reference=True, **kld_args),
        args.repeats,
    )
    ref0 = refs[(k0, torch.float16)][0]
    build_s = min(_timed(lambda: dv.reference_from_logits(fp_logits[0], windows[0][1:], k0, m))[2] for _ in range(3))
    compare_s = min(_timed(lambda: dv.compare_logits(ref0, fp_logits[0]))[2] for _ in range(3))
    forward_s = min(_timed(lambda: next(iter_next_token_logits(fp, windows[:1])))[2] for _ in range(3))
    timings = [{"cell": "fp16 (builds the reference)", **fp_race}]

    pct = [50, 90, 99, 99.9]
    rows, errors = [], []
    for quant in args.quants.split(","):
        spec = build_cell(compose_config([f"model={args.model}", f"quant={quant}"])).quant
        model = loaded.fresh_copy()
        quantize_model(model, spec, get_method("rtn"), None)
        q_logits = list(iter_next_token_logits(model, windows, f"{quant} logits"))
        exact = torch.cat([full_kld(p, q) for p, q in zip(fp_logits, q_logits)])
        err: dict[str, object] = {"quant": quant}
        for (k, dt), ref in refs.items():
            divs = [dv.compare_logits(r, q) for r, q in zip(ref, q_logits)]
            est, bound = torch.cat([d.kld for d in divs]), torch.cat([d.kld_bound for d in divs])
            if dt == torch.float16:
                err[f"k{k} bound"] = 100 * (bound.mean().item() / exact.mean().item() - 1)
                err[f"k{k}+m{m}"] = 100 * (est.mean().item() / exact.mean().item() - 1)
            else:
                err[f"k{k}+m{m} fp32"] = 100 * (est.mean().item() / exact.mean().item() - 1)
            if (k, dt) == (k0, torch.float16):
                est_pct = np.percentile(est.numpy(), pct)
        argmax_agree = torch.cat([p.argmax(-1) == q.argmax(-1) for p, q in zip(fp_logits, q_logits)]).double().mean()
        del q_logits
        with_kld = perplexity(model, *ppl_args, **kld_args)
        if quant in args.timing_quants.split(","):
            plain = perplexity(model, *ppl_args)
            assert with_kld.ppl == plain.ppl and with_kld.nll == plain.nll
            race = _race(
                lambda model=model: perplexity(model, *ppl_args),
                lambda model=model: perplexity(model, *ppl_args, **kld_args),
                args.repeats,
            )
            timings.append({"cell": quant, **race})
        d = with_kld.divergence
        full_pct = np.percentile(exact.numpy(), pct)
        rows.append(
            {
                "quant": quant,
                "ppl": with_kld.ppl,
                "kld_full": exact.mean().item(),
                "kld": d["kld"],
                "kld_stderr": d["kld_stderr"],
                "err_%": 100 * (d["kld"] / exact.mean().item() - 1),
                "top1_agree": d["top1_agree"],
                "argmax_eq": argmax_agree.item(),
                "p99_full": full_pct[2],
                "kld_p99": d["kld_p99"],
                "pct_err_%": "/".join(f"{100 * (a / b - 1):+.1f}" for a, b in zip(est_pct, full_pct)),
            }
        )
        errors.append(err)
        print(f"{quant}: full KLD {exact.mean():.5f}, reported {d['kld']:.5f}, top-1 {d['top1_agree']:.4f}", flush=True)
        del model

    table, err_table, time_table = pd.DataFrame(rows), pd.DataFrame(errors), pd.DataFrame(timings)
    time_table["ratio"] = time_table.with_kld_s / time_table.plain_s
    time_table["cpu_ratio"] = time_table.with_kld_cpu_s / time_table.plain_cpu_s
    tokens = args.windows * (args.seqlen - 1)
    print(
        f"\n{args.model}, {args.dataset}, {args.windows} x {args.seqlen} tokens ({tokens} predicted), float32, "
        f"{torch.get_num_threads()} threads; FP ppl {fp_plain.ppl:.3f}; reported KLD: k = {k0}, m = {m}, float16\n"
    )
    print(table.to_markdown(index=False, floatfmt=".4f"))
    print("\n(pct_err_%: p50/p90/p99/p99.9 of the per-token estimate against the full KLD's)")
    print("\nrelative error of the mean KLD, % (bound: top k + rest bucket only; +m: with the sampled rest)")
    print(err_table.to_markdown(index=False, floatfmt="+.3f"))

    def ordered(names: list[str], col: str, increasing: bool) -> bool:
        vals = [float(table.loc[table.quant == n, col].iloc[0]) for n in names if n in set(table.quant)]
        return len(vals) == len(names) and all((a < b) if increasing else (a > b) for a, b in zip(vals, vals[1:]))

    print("\nacceptance")
    for name in ("w4g128", "kv4"):
        if name in set(table.quant):
            e = float(table.loc[table.quant == name, "err_%"].iloc[0])
            print(f"  {name}: reported KLD within 2 % of the full-vocabulary KLD: {abs(e) <= 2} ({e:+.3f} %)")
    for names in (["w8", "w4g128", "w3g128"], ["kv4", "kv3", "kv2"]):
        print(
            f"  {' < '.join(names)}: KLD increases {ordered(names, 'kld', True)}, "
            f"top-1 agreement decreases {ordered(names, 'top1_agree', False)}"
        )
    size = cache_file.stat().st_size
    print(
        f"\nreference cache (k = {k0}, m = {m}): {size / args.windows / 1024:.0f} KiB per {args.seqlen}-token window "
        f"({size / tokens:.0f} bytes per token; {size / 1024:.0f} KiB for {args.windows} windows)"
    )
    print(
        f"\nperplexity passes, seconds for all {args.windows} windows (minimum of {args.repeats}, interleaved): "
        "plain vs with the comparison (quantized cells: cached reference)"
    )
    print(time_table.to_markdown(index=False, floatfmt=".3f"))
    print(
        f"per window, CPU seconds (minimum of 3): forward {forward_s:.3f}, building the reference {build_s:.3f} "
        f"({build_s / forward_s:.3f} of the forward), comparing {compare_s:.3f} ({compare_s / forward_s:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
