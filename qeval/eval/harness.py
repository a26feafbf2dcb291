"""Glue to lm-evaluation-harness: score an in-memory (quantized) model with
lm-eval's own ``simple_evaluate``, so task definitions and metrics are
lm-eval's and never re-implemented here.

Task plugins live in the repository's ``tasks/`` folder (and any folder in
``QEVAL_TASKS_PATH``, separated by ``os.pathsep``); lm-eval's built-in tasks
stay available under their usual names for online users.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"


def task_paths(extra: tuple[str, ...] = ()) -> list[str]:
    paths = [str(REPO_TASKS_DIR)] if REPO_TASKS_DIR.is_dir() else []
    env = os.environ.get("QEVAL_TASKS_PATH")
    if env:
        paths += [p for p in env.split(os.pathsep) if p]
    return paths + list(extra)


@lru_cache(maxsize=4)
def task_manager(extra: tuple[str, ...] = ()):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_paths(extra))


def task_exists(name: str, extra: tuple[str, ...] = ()) -> bool:
    return name in task_manager(extra).all_tasks


def _split_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval keys look like 'acc,none' and 'acc_stderr,none'; keep 'acc', 'acc_stderr'."""
    metrics = {}
    for key, value in task_results.items():
        if key == "alias" or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        metrics[metric if filt in ("none", "") else f"{metric}[{filt}]"] = float(value)
    return metrics


def evaluate_lm_eval(model, tokenizer, task: str, limit: int | None = None, num_fewshot: int = 0,
                     batch_size: int = 16, seed: int = 0, extra_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one lm-eval task on an in-memory model; returns metrics with stderr and sample counts."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(next(model.parameters()).device))
    out = simple_evaluate(
        model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=task_manager(extra_paths),
        bootstrap_iters=1000, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    metrics = _split_metrics(out["results"][task])
    n = out.get("n-samples", {}).get(task, {})
    metrics["samples"] = int(n.get("effective", n.get("original", 0)))
    return metrics
