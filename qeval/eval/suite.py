"""Run a cell's task suite: resolve each entry to a task kind, check it, evaluate it.

Three kinds of suite entries share one loop:

* ``perplexity``: the quantization papers' protocol (qeval.eval.perplexity);
* ``lm_eval``: a task (or group) run by lm-eval's ``simple_evaluate``;
* ``native``: a qeval-native task from the registry (qeval.eval.registry).

``kind: auto`` (the default) picks ``native`` when a native task has the name
and ``lm_eval`` otherwise.  Every score is stored with its standard error and
sample count; the task's family, primary metric and direction are stored
beside the scores so reports never need to know task names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qeval.config import ConfigError, SuiteSpec, TaskEntry
from qeval.data import check_available
from qeval.eval.harness import score_lm_eval
from qeval.eval.items import Columns
from qeval.eval.perplexity import perplexity, prepare_reference
from qeval.eval.plugin_checks import check_plugin_folders, check_task_plugin
from qeval.eval.registry import (
    ONLINE_TASKS,
    LazyReference,
    TaskContext,
    TaskDataError,
    TaskParamError,
    discover_native,
    task_exists,
    task_info,
    task_manager,
    task_paths,
)
from qeval.eval.scorer import Scorer, as_scorer

log = logging.getLogger(__name__)


def resolve_kind(task: TaskEntry, include: tuple[str, ...] = ()) -> str:
    if task.kind != "auto":
        return task.kind
    return "native" if task.task in discover_native(include) else "lm_eval"


def suite_kinds(suite: SuiteSpec, include: tuple[str, ...] = ()) -> dict[str, str]:
    """The kind each entry resolves to (perplexity, lm_eval, native)."""
    return {name: resolve_kind(task, include) for name, task in suite.tasks.items()}


def check_suite(suite: SuiteSpec, include: tuple[str, ...] = (), data_dir: str | None = None) -> None:
    """Everything about the suite that can be checked without a model: names and data."""
    try:
        native = discover_native(include)
    except TaskDataError as err:
        raise ConfigError(str(err)) from err
    check_plugin_folders(include)  # a malformed YAML names its file and line, not "no such task"
    for name, task in suite.tasks.items():
        kind = resolve_kind(task, include)
        if kind == "perplexity":
            check_available(task.dataset, data_dir)
        elif kind == "native":
            if task.task not in native:
                raise ConfigError(
                    f"invalid value suite.tasks.{name}.task={task.task!r}: no native task of that name "
                    f"(known: {', '.join(sorted(native))})"
                )
            try:
                instance = native[task.task](**task.params)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"invalid suite.tasks.{name}.params for {task.task!r}: {err}") from err
            try:
                instance.check_available(data_dir, include=include)
            except TaskDataError as err:
                raise ConfigError(f"suite.tasks.{name}: {err}") from err
        else:
            online = ONLINE_TASKS.get(task.task)
            if online is not None:
                from qeval.offline import offline

                if offline():
                    raise ConfigError(
                        f"suite.tasks.{name}: {task.task} is lm-eval's own task and reads the Hub dataset "
                        f"{online.hub}, which has no offline copy, and downloads are off (HF_HUB_OFFLINE=1 or "
                        f"QEVAL_OFFLINE=1); drop the entry ('~suite.tasks.{name}') or run with the Hub reachable"
                    )
                continue
            if not task_exists(task.task, include, data_dir):
                raise ConfigError(
                    f"invalid value suite.tasks.{name}.task={task.task!r}: neither a native task nor an "
                    f"lm-eval task (searched lm-eval's tasks and {', '.join(task_paths(include))}; "
                    "list them with qeval-tasks)"
                )
            # its !function modules and local data files, found now rather than after a model loaded
            check_task_plugin(name, task.task, task_manager(include, data_dir, names=[task.task]), task_paths(include))


def describe_suite(suite: SuiteSpec, include: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Per suite entry: the task behind it, its kind, family, primary metric and direction."""
    out = {}
    for name, task in suite.tasks.items():
        kind = resolve_kind(task, include)
        if kind == "perplexity":
            out[name] = {
                "task": task.dataset,
                "kind": kind,
                "family": "basic_nlp",
                "primary_metric": "ppl",
                "higher_is_better": False,
            }
            continue
        info = task_info(task.task, include)
        out[name] = {
            "task": task.task,
            "kind": kind,
            "family": task.family or info.family,
            "primary_metric": info.primary_metric,
            "higher_is_better": info.higher_is_better,
        }
        if kind == "native":  # the per-item column the paired analysis compares, and its direction
            plugin = discover_native(include)[task.task]
            out[name]["item_outcome"] = plugin.outcome_column()
            out[name]["item_higher_is_better"] = plugin.outcome_higher_is_better()
    return out


@dataclass(frozen=True)
class EvalSettings:
    """What a suite's evaluation needs besides the scorer (never the quantization spec)."""

    seed: int = 0
    data_dir: str | None = None
    include: tuple[str, ...] = ()
    # where native tasks cache the unquantized model's outputs (dialogue references)
    reference_dir: Path = Path("results") / ".reference"
    # this cell is the unquantized model (native tasks then produce the references)
    is_reference: bool = False
    # perplexity entries without their own decode_chunk: tokens per forward through the cache
    # (a cache that quantizes only stored tokens is never read by a single pass)
    decode_chunk: int | None = None
    # the type of device the model computes on ("cpu", "cuda"): batch_size=auto depends on it
    device: str = "cpu"


#: what ``batch_size: auto`` means where lm-eval's search for the largest batch that fits is not
#: used: on the CPU (it would try batches of hundreds, in RAM) and for qeval-native tasks
AUTO_BATCH_FALLBACK = 16


def batch_size_for(task: TaskEntry, kind: str, device: str) -> int | str:
    """A suite entry's batch size: its own number, or for ``auto`` lm-eval's search (an lm-eval
    task on a GPU: the largest batch that fits, found by trying) or :data:`AUTO_BATCH_FALLBACK`."""
    if task.batch_size != "auto":
        return int(task.batch_size)
    return "auto" if kind == "lm_eval" and device == "cuda" else AUTO_BATCH_FALLBACK


@dataclass
class SuiteScores:
    """A suite's outcome: per entry its metrics, its seconds, and its per-item table (None for
    a native plugin that keeps none)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, Columns | None] = field(default_factory=dict)


TaskDone = Callable[[str, dict[str, Any], float, "Columns | None"], None]


def _native_context(
    task: TaskEntry,
    settings: EvalSettings,
    model: Any,
    tokenizer: Any,
    reference: Any,
    fingerprint: str,
    is_reference: bool,
    scorer: Any = None,
) -> TaskContext:
    """The context a native task gets for one suite entry, whether it is preparing its FP
    reference (:func:`prepare_references`) or evaluating (:func:`evaluate_suite`)."""
    return TaskContext(
        model=model,
        tokenizer=tokenizer,
        seed=settings.seed,
        limit=task.limit,
        reference=reference,
        reference_fingerprint=fingerprint,
        cache_dir=settings.reference_dir,
        data_dir=settings.data_dir,
        is_reference=is_reference,
        scorer=scorer,
        extra={
            "batch_size": batch_size_for(task, "native", settings.device),
            "num_fewshot": task.num_fewshot,
            "include": settings.include,
            "gen_kwargs": task.gen_kwargs,
            "apply_chat_template": task.apply_chat_template,
        },
    )


def check_chat_settings(suite: SuiteSpec, tokenizer: Any) -> None:
    """Settings the tokenizer must support, checked once it is loaded and before any quantizing:
    ``thinking: on|off`` needs a chat template with the ``enable_thinking`` switch (otherwise the
    setting would silently change nothing)."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    for name, task in suite.tasks.items():
        if task.thinking != "default" and "enable_thinking" not in template:
            raise TaskParamError(
                f"invalid value suite.tasks.{name}.thinking={task.thinking!r}: the model's chat template "
                f"{'has no enable_thinking switch' if template else 'is missing'} (Qwen3-style templates "
                "have one); use thinking=default"
            )


def prepare_references(model: Any, tokenizer: Any, suite: SuiteSpec, settings: EvalSettings, fingerprint: str) -> None:
    """Compute with ``model`` — the unquantized model, a cell's own copy before it is quantized
    — whatever the suite's entries compare the quantized model with, and cache it under
    ``settings.reference_dir`` keyed by ``fingerprint``: the FP next-token distributions of the
    perplexity windows (KL divergence), and what native tasks declare
    (:meth:`NativeTask.prepare_reference`: MT-Bench's FP answers).  Entries already cached cost a
    lookup.  Afterwards :func:`evaluate_suite` needs no reference model, only the fingerprint."""
    include = settings.include
    check_chat_settings(suite, tokenizer)
    for name, task in suite.tasks.items():
        kind = resolve_kind(task, include)
        if kind == "perplexity":
            chunk = task.decode_chunk if task.decode_chunk is not None else settings.decode_chunk
            prepare_reference(
                model,
                tokenizer,
                task.dataset,
                task.seqlen,
                task.max_windows,
                settings.data_dir,
                chunk,
                settings.reference_dir / "divergence",
                fingerprint,
            )
        elif kind == "native":
            native = discover_native(include)[task.task](**task.params)
            ctx = _native_context(task, settings, model, tokenizer, model, fingerprint, is_reference=False)
            log.debug("  %s: preparing its FP reference", name)
            native.prepare_reference(ctx)


def evaluate_suite(
    scorer: Scorer | Any,
    tokenizer: Any,
    suite: SuiteSpec,
    settings: EvalSettings,
    reference: Any = None,
    reference_fingerprint: str = "",
    finished: dict[str, dict[str, Any]] | None = None,
    on_task_done: TaskDone | None = None,
    reference_loader: Callable[[], Any] | None = None,
) -> SuiteScores:
    """Score ``scorer`` on every suite entry: metrics, seconds and per-item table per entry.

    ``finished`` holds entries already scored by an earlier, interrupted run of the
    same cell ({"metrics", "seconds", "items"} per name): they are reused, not re-run.
    ``on_task_done(name, metrics, seconds, items)`` is called after each newly scored entry
    so that the caller can keep it.  ``reference``: the unquantized model, where the caller holds
    one (tools, tests); a sweep holds none — its references were prepared and cached
    (:func:`prepare_references`) — and gives native tasks ``reference_loader`` instead, which
    loads one only if a task reads ``ctx.reference`` while evaluating.
    """
    scorer = as_scorer(scorer, tokenizer)  # a bare HF model (tests, benchmarks) is scored in process
    check_chat_settings(suite, tokenizer)
    include = settings.include
    out = SuiteScores()
    finished = finished or {}
    for name, task in suite.tasks.items():
        if name in finished:
            kept = finished[name]
            out.metrics[name], out.seconds[name] = kept["metrics"], kept["seconds"]
            out.items[name] = kept.get("items")
            log.info("  %s: %s (kept from an interrupted run)", name, _short(out.metrics[name]))
            continue
        t0 = time.perf_counter()
        kind = resolve_kind(task, include)
        items: Columns | None = None
        if kind == "perplexity":
            chunk = task.decode_chunk if task.decode_chunk is not None else settings.decode_chunk
            # the FP model's next-token distributions, computed once per model and cached, give
            # every cell's perplexity pass its divergence from the FP model (qeval.eval.divergence)
            has_reference = reference is not None or settings.is_reference or bool(reference_fingerprint)
            result = perplexity(
                scorer,
                tokenizer,
                task.dataset,
                task.seqlen,
                task.max_windows,
                settings.data_dir,
                chunk,
                reference_model=reference,
                reference_cache_dir=settings.reference_dir / "divergence" if has_reference else None,
                reference_key=reference_fingerprint,
                is_reference=settings.is_reference,
            )
            metrics = result.as_metrics()
            metrics["decode_chunk"] = chunk or 0
            items = result.items or None  # one row per window
        elif kind == "native":
            native = discover_native(include)[task.task](**task.params)
            fp_model = reference
            if fp_model is None and reference_loader is not None:
                fp_model = LazyReference(reference_loader, name)
            ctx = _native_context(
                task,
                settings,
                scorer.hf_model,
                tokenizer,
                fp_model,
                reference_fingerprint,
                settings.is_reference,
                scorer,
            )
            metrics = native.evaluate(ctx)
            items = ctx.items  # validated by ctx.keep_items
        else:
            metrics, items = score_lm_eval(
                scorer,
                tokenizer,
                task.task,
                limit=task.limit,
                num_fewshot=task.num_fewshot,
                batch_size=batch_size_for(task, "lm_eval", settings.device),
                seed=settings.seed,
                include=include,
                gen_kwargs=task.gen_kwargs,
                apply_chat_template=task.apply_chat_template,
                data_dir=settings.data_dir,
                thinking=task.thinking,
                max_gen_toks=task.max_gen_toks,
            )
        seconds = time.perf_counter() - t0
        out.metrics[name], out.seconds[name], out.items[name] = metrics, seconds, items
        log.info("  %s: %s (%.1fs)", name, _short(metrics), seconds)
        if on_task_done is not None:
            on_task_done(name, metrics, seconds, items)
    return out


def _short(metrics: dict[str, Any]) -> str:
    keys = [k for k in metrics if not k.endswith("_stderr") and isinstance(metrics[k], (int, float))][:4]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys)
