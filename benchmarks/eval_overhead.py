"""Evaluation overhead: qeval's unquantized evaluation of a log-likelihood task against
lm-eval's own ``hf`` model on the same model folder, data, dtype and batch size.

qeval scores lm-eval tasks with shared-context scoring (``HFScorer(shared_context=True)``,
qeval.eval.shared_context: each multiple-choice context computed once);
``--no-shared-context`` times lm-eval's plain ``HFLM`` around the in-memory model instead.

Each side is timed from the model folder on disk to the final score, in one process,
in ABBA order (qeval, lm-eval, lm-eval, qeval, ...) so that warm-up and machine drift
fall on both sides alike:

* qeval: ``load_model`` (the per-process cache is cleared first, so the load is paid)
  and ``evaluate_lm_eval`` on an ``HFScorer`` of the in-memory model -- the calls a sweep
  cell makes;
* lm-eval: ``simple_evaluate(model="hf", model_args={"pretrained": <folder>})`` -- what
  ``lm_eval --model hf`` runs -- with lm-eval's own ``arc_easy`` task whose rows come
  from the same local files (see benchmarks/lmeval_parity.py; the Hub is unreachable).

The ratio is lm-eval seconds / qeval seconds: >= 1.0 means qeval is no slower.  Every
metric of the task (ARC: acc and acc_norm) is compared for equality.  ``--threads`` sets
torch's thread count for both sides (on a CPU shared with other jobs, one thread avoids the
stalls of OpenMP threads waiting for each other).

    python benchmarks/eval_overhead.py --model smollm2-135m --limit 500 --batch-size 16 --rounds 2
    python benchmarks/eval_overhead.py --limit 200 --rounds 1 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmeval_parity import PAIRS, equal, lm_eval_reference  # noqa: E402

from qeval.cli import compose_config  # noqa: E402
from qeval.eval import harness, registry  # noqa: E402
from qeval.eval.scorer import HFScorer  # noqa: E402
from qeval.models.loading import clear_process_cache, load_model, resolve_pretrained_path  # noqa: E402


def time_qeval(cfg, task: str, limit: int, batch_size: int, shared_context: bool) -> tuple[float, dict]:
    clear_process_cache()
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, cfg.cache_dir)
    scorer = HFScorer(loaded.model, loaded.tokenizer, shared_context=shared_context)
    metrics = harness.evaluate_lm_eval(
        scorer, loaded.tokenizer, task, limit=limit, num_fewshot=0, batch_size=batch_size
    )
    return time.perf_counter() - t0, metrics


def time_lm_eval(pretrained: str, task: str, limit: int, batch_size: int, dtype: str) -> tuple[float, dict]:
    pair = PAIRS[task]
    t0 = time.perf_counter()
    out, _ = lm_eval_reference(pretrained, pair, limit, batch_size, dtype=dtype)
    seconds = time.perf_counter() - t0
    ref = out["results"][pair.reference]
    return seconds, {m: float(ref[f"{m},none"]) for m in pair.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="qeval_arc_easy", choices=sorted(PAIRS))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each times both sides twice)")
    parser.add_argument(
        "--no-shared-context",
        dest="shared_context",
        action="store_false",
        help="qeval's side scores with lm-eval's plain HFLM (the measurement before shared contexts)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = compose_config([f"model={args.model}"])
    pretrained = resolve_pretrained_path(cfg.model, cfg.cache_dir)
    registry.task_manager()  # index lm-eval's task registry once, outside both timings
    times: dict[str, list[float]] = {"qeval": [], "lm-eval": []}
    scores: dict[str, dict] = {}
    for r in range(args.rounds):
        for side in ("qeval", "lm-eval", "lm-eval", "qeval"):
            if side == "qeval":
                seconds, scores[side] = time_qeval(cfg, args.task, args.limit, args.batch_size, args.shared_context)
            else:
                seconds, scores[side] = time_lm_eval(
                    pretrained, args.task, args.limit, args.batch_size, cfg.model.dtype
                )
            times[side].append(seconds)
            print(f"round {r + 1}: {side:7s} {seconds:6.1f}s", flush=True)
    q, ref = statistics.mean(times["qeval"]), statistics.mean(times["lm-eval"])
    metrics = PAIRS[args.task].metrics
    scoring = "shared-context scoring" if args.shared_context else "lm-eval's HFLM"
    print(
        f"\nmodel {args.model} ({cfg.model.dtype}), task {args.task} ({args.limit} docs), "
        f"batch size {args.batch_size}, {args.rounds} ABBA round(s), {torch.get_num_threads()} torch thread(s); "
        f"qeval side: {scoring}\n"
    )
    print("| side | runs (s) | mean (s) | " + " | ".join(metrics) + " |")
    print("|---|---|---|" + "---|" * len(metrics))
    for side, mean in (("qeval", q), ("lm-eval", ref)):
        runs = ", ".join(f"{t:.1f}" for t in times[side])
        values = " | ".join(f"{scores[side][m]:.4f}" for m in metrics)
        print(f"| {side} | {runs} | {mean:.1f} | {values} |")
    same = all(equal(scores["qeval"][m], scores["lm-eval"][m]) for m in metrics)
    print(
        f"\nratio lm-eval / qeval = {ref / q:.3f} (>= 1.0: qeval no slower); scores equal ({', '.join(metrics)}): {same}"
    )


if __name__ == "__main__":
    main()
