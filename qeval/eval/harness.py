"""Glue to lm-evaluation-harness: score an in-memory (quantized) model with
lm-eval's own ``simple_evaluate``, so task definitions and metrics are
lm-eval's and never re-implemented here.

Which tasks exist, and where their plugins live (the repository's ``tasks/``
folder, ``QEVAL_TASKS_PATH``, ``tasks.include``), is :mod:`qeval.eval.registry`'s
business; this module only runs them.  lm-eval's built-in tasks stay available
under their usual names for online users.
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypedDict, Unpack

from qeval.eval.items import Columns, lm_eval_items, metric_column
from qeval.eval.reasoning import generation_columns, generation_metrics
from qeval.eval.registry import task_manager
from qeval.eval.scorer import as_scorer

log = logging.getLogger(__name__)


class LmEvalOptions(TypedDict, total=False):
    """How one lm-eval task is run: the keyword arguments :func:`run_lm_eval` takes beside the
    model and the task, named once here so :func:`score_lm_eval` and :func:`evaluate_lm_eval`
    forward them without restating (and possibly mis-ordering) each one. Defaults live in
    :func:`run_lm_eval`'s signature."""

    limit: int | None
    num_fewshot: int | None
    batch_size: int | str
    seed: int
    include: tuple[str, ...]
    gen_kwargs: str | None
    apply_chat_template: bool
    data_dir: str | None
    thinking: str
    max_gen_toks: int | None


def _split_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval keys look like 'acc,none' and 'acc_stderr,none'; keep 'acc', 'acc_stderr'."""
    metrics = {}
    for key, value in task_results.items():
        if key == "alias" or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        metrics[metric_column(metric, filt)] = float(value)
    return metrics


def run_lm_eval(
    model,
    tokenizer,
    task: str,
    *,
    limit: int | None = None,
    num_fewshot: int | None = 0,
    batch_size: int | str = 16,
    seed: int = 0,
    include: tuple[str, ...] = (),
    log_samples: bool = False,
    gen_kwargs: str | None = None,
    apply_chat_template: bool = False,
    data_dir: str | None = None,
    thinking: str = "default",
    max_gen_toks: int | None = None,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on a scorer (or a bare HF model); returns lm-eval's whole
    output, plus under ``"qeval_generations"`` how each generation ended ({(task, doc id):
    :class:`qeval.eval.reasoning.Generation`}, empty for a backend that does not record them).
    ``data_dir`` is the data folder qeval's task loaders read (None: the default one);
    ``thinking`` (on/off) sets the chat template's ``enable_thinking``; ``max_gen_toks`` is the
    generation budget (added to ``gen_kwargs``)."""
    # lm_eval's evaluator and HF model import in seconds (datasets, transformers): only cells
    # that run an lm-eval task pay for them
    from lm_eval import simple_evaluate

    # lm-eval bootstraps some standard errors (perplexity, F1, BLEU) in a fork()ed process pool:
    # forking a process that runs torch threads can deadlock, and under submitit (whose job
    # handler ignores SIGTERM, inherited by the forked workers) Pool.terminate() waits forever.
    # The serial path draws the same seeded resamples, so the numbers are identical.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    chat_args = {} if thinking == "default" else {"enable_thinking": thinking == "on"}
    if max_gen_toks is not None:  # the entry's budget replaces one its gen_kwargs name
        kept = [p for p in (gen_kwargs or "").split(",") if p.strip() and p.split("=")[0].strip() != "max_gen_toks"]
        gen_kwargs = ",".join([*kept, f"max_gen_toks={int(max_gen_toks)}"])
    lm = as_scorer(model, tokenizer).lm_eval_model(batch_size, chat_args)
    out = simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(include, data_dir, names=[task]),
        bootstrap_iters=1000,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        gen_kwargs=gen_kwargs,
        apply_chat_template=apply_chat_template,
    )
    out["qeval_generations"] = dict(getattr(lm, "generations", None) or {})
    if hasattr(lm, "generations"):
        lm.generations = {}  # a backend that keeps its lm-eval model across entries starts afresh
    return out


def generation_summary(out: dict[str, Any], items: Columns) -> dict[str, float]:
    """Response metrics of the generation requests behind ``out`` (:func:`generation_metrics`)
    and, in place, their per-item columns in ``items`` (joined on the item id: ``<doc id>``, or
    ``<subtask>/<doc id>`` for a group); {} when nothing was generated or recorded."""
    generations = out.get("qeval_generations") or {}
    if not generations:
        return {}
    grouped = len(out.get("samples") or {}) > 1
    by_id = {(f"{task}/{doc}" if grouped else str(doc)): g for (task, doc), g in generations.items()}
    if items.get("id"):
        items.update(generation_columns([by_id.get(i) for i in items["id"]]))
    return generation_metrics(list(by_id.values()))


def evaluate_lm_eval(model, tokenizer, task: str, **options: Unpack[LmEvalOptions]) -> dict[str, Any]:
    """Run one lm-eval task (or group) on a scorer; metrics with stderr and sample counts
    (:func:`score_lm_eval` without the per-item table)."""
    return score_lm_eval(model, tokenizer, task, **options)[0]


def score_lm_eval(model, tokenizer, task: str, **options: Unpack[LmEvalOptions]) -> tuple[dict[str, Any], Columns]:
    """Run one lm-eval task (or group) on a scorer: (metrics with stderr and sample counts,
    the per-item table from lm-eval's logged samples; see qeval.eval.items).

    For a group (e.g. MMLU's 56 subjects) the group's aggregate is returned, with
    ``samples`` summed over its subtasks, and item ids are ``<subtask>/<doc_id>``.  A generation
    task's metrics also describe its responses (length mean/p90, shares truncated, unclosed,
    looping: :func:`generation_summary`), with the same measures per item.
    """
    out = run_lm_eval(model, tokenizer, task, log_samples=True, **options)
    metrics = _split_metrics(out["results"][task])
    counts = out.get("n-samples", {})
    if task in counts:
        n = counts[task]
        metrics["samples"] = int(n.get("effective", n.get("original", 0)))
    else:  # a group: its subtasks' counts
        metrics["samples"] = int(sum(n.get("effective", n.get("original", 0)) for n in counts.values()))
    items = lm_eval_items(out.get("samples") or {})
    metrics.update(generation_summary(out, items))
    return metrics, items
