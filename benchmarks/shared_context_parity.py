"""Shared-context scoring against lm-eval's plain ``HFLM`` on the same in-memory model.

Each task runs twice through qeval's ``run_lm_eval`` (the sweep's call), once with
``HFScorer(shared_context=False)`` (lm-eval's ``HFLM``) and once with
``HFScorer(shared_context=True)`` (``qeval.eval.shared_context.SharedContextLM``), with
lm-eval's per-sample log-likelihoods logged.  Printed per task: the largest absolute
difference of any request's log-likelihood, how many greedy flags differ, whether every
accuracy (the task's and each subtask's) is equal, the largest relative difference of the
other metrics (perplexity), and each side's scoring time (one run each, HFLM first: indicative only;
benchmarks/eval_overhead.py is the timed comparison).

    python benchmarks/shared_context_parity.py --model smollm2-135m \\
        --tasks qeval_arc_easy,qeval_mmlu,qeval_lambada_openai --limits qeval_arc_easy=200,qeval_mmlu=3,qeval_lambada_openai=100
    python benchmarks/shared_context_parity.py --quant w8a8 --floor-batch-size 4   # HFLM vs itself too
    python benchmarks/shared_context_parity.py --quant w8a8 --float64              # exactness, noise aside

Quantized specs amplify float32 rounding: a dynamic per-token int8 scale set by an outlier
channel (SmolLM2 has activations near 3,000) turns a last-bit difference into a code flip
worth several units.  ``HFLM`` then moves as much between batch sizes as against the shared
path (``--floor-batch-size``); in float64 (``--float64``) both paths agree to rounding.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

from qeval.cli import compose_config
from qeval.eval import harness, registry
from qeval.eval.scorer import HFScorer, shared_context_allowed
from qeval.models.loading import load_model


def run(model, tokenizer, task: str, limit: int | None, batch_size: int, shared: bool) -> tuple[float, dict]:
    scorer = HFScorer(model, tokenizer, shared_context=shared)
    t0 = time.perf_counter()
    out = harness.run_lm_eval(
        scorer, tokenizer, task, limit=limit, num_fewshot=0, batch_size=batch_size, log_samples=True
    )
    return time.perf_counter() - t0, out


def responses(out: dict) -> dict[tuple[str, int, int], tuple[float, bool]]:
    """(subtask, doc id, request index) -> (log-likelihood, is greedy), for every logged request."""
    found = {}
    for subtask, samples in out["samples"].items():
        for sample in samples:
            for k, resp in enumerate(sample["resps"]):
                ll, greedy = resp[0]
                found[(subtask, sample["doc_id"], k)] = (float(ll), bool(greedy))
    return found


def metrics(out: dict) -> dict[tuple[str, str], float]:
    """(task or subtask, lm-eval metric key) -> value, standard errors left out."""
    return {
        (name, key): float(value)
        for name, values in out["results"].items()
        for key, value in values.items()
        if isinstance(value, (int, float)) and "stderr" not in key
    }


def compare(ref_out: dict, out: dict, task: str) -> tuple[float, int, bool, float]:
    """(max abs Δ log-likelihood, greedy flags differing, accuracies equal, max rel. Δ of the
    other metrics) of ``out`` against ``ref_out``."""
    ref, ours = responses(ref_out), responses(out)
    assert ref.keys() == ours.keys()
    diff = max(abs(ref[k][0] - ours[k][0]) for k in ref)
    flips = sum(ref[k][1] != ours[k][1] for k in ref)
    m_ref, m_ours = metrics(ref_out), metrics(out)
    assert m_ref.keys() == m_ours.keys()
    # accuracies must be identical; continuous metrics (LAMBADA's perplexity) follow the
    # log-likelihoods' last digits: their largest relative difference is shown
    acc_same = all(m_ref[k] == m_ours[k] for k in m_ref if k[1].startswith("acc"))
    rel = [abs(m_ref[k] - m_ours[k]) / max(abs(m_ref[k]), 1e-12) for k in m_ref if not k[1].startswith("acc")]
    return diff, flips, acc_same, max(rel, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="fp16", help="a quant preset, quantized with RTN (no calibration)")
    parser.add_argument("--tasks", default="qeval_arc_easy,qeval_mmlu,qeval_lambada_openai")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--limits", default="qeval_mmlu=3", help="per-task limits, e.g. qeval_mmlu=3")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--floor-batch-size",
        type=int,
        default=None,
        help="also run HFLM at this batch size: how far HFLM moves from itself (the noise floor)",
    )
    parser.add_argument(
        "--float64", action="store_true", help="score in float64 (rounding noise out of the way: exactness check)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = {k: int(v) for k, v in (item.split("=", 1) for item in args.limits.split(",") if item)}

    cfg = compose_config([f"model={args.model}", f"quant={args.quant}"])
    loaded = load_model(cfg.model, cfg.cache_dir)
    model = loaded.model
    if args.float64 or args.quant != "fp16":
        model = copy.deepcopy(model)
    if args.float64:
        model = model.double()
    if args.quant != "fp16":
        from qeval.cell import build_cell
        from qeval.quant.apply import quantize_model
        from qeval.quant.recipe import get_method

        cell = build_cell(cfg)
        allowed, reason = shared_context_allowed(cell.quant)
        print(f"shared_context_allowed({args.quant}) = {allowed} {reason}")
        model = quantize_model(model, cell.quant, get_method("rtn"))
    registry.task_manager()
    sides = [("HFLM", args.batch_size, False), ("shared", args.batch_size, True)]
    if args.floor_batch_size:
        sides.append((f"HFLM bs {args.floor_batch_size}", args.floor_batch_size, False))
    rows: list[tuple[Any, ...]] = []
    for task in (t.strip() for t in args.tasks.split(",") if t.strip()):
        limit = limits.get(task, args.limit)
        times, outs = {}, {}
        for name, batch_size, shared in sides:
            times[name], outs[name] = run(model, loaded.tokenizer, task, limit, batch_size, shared)
            print(f"{task}: {name} {times[name]:6.1f}s", flush=True)
        n = len(responses(outs["HFLM"]))
        acc_ref = metrics(outs["HFLM"])[(task, "acc,none")]
        for name, _, _ in sides[1:]:
            diff, flips, same, rel = compare(outs["HFLM"], outs[name], task)
            acc = metrics(outs[name])[(task, "acc,none")]
            ratio = times["HFLM"] / times[name]
            rows.append((task, limit, n, name, diff, flips, same, rel, acc_ref, acc, times["HFLM"], times[name], ratio))
    dtype = "float64" if args.float64 else cfg.model.dtype
    print(
        f"\nmodel {args.model} ({dtype}), quant {args.quant} (RTN), batch size {args.batch_size}, "
        f"{torch.get_num_threads()} torch thread(s); every side compared with HFLM at batch size {args.batch_size}\n"
    )
    print(
        "| task | limit | requests | side | max abs Δ log-likelihood | greedy flags differing | accuracies equal "
        "| other metrics: max rel. Δ | acc HFLM | acc side | HFLM s | side s | HFLM / side |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task, limit, n, name, diff, flips, same, rel, a, b, ta, tb, ratio in rows:
        print(
            f"| {task} | {limit} | {n} | {name} | {diff:.2e} | {flips} | {same} | {rel:.1e} | {a:.4f} | {b:.4f} "
            f"| {ta:.1f} | {tb:.1f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
