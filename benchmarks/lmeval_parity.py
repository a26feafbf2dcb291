"""Check that qeval's task scores equal lm-eval's own scoring on the same model and data.

lm-eval is run the way a user runs it (``model="hf"`` from the model folder, its
own registered task or group, e.g. ``arc_easy`` or ``mmlu``) with only the dataset
replaced: each of its tasks gets a ``custom_dataset`` that returns the local rows
in the Hub schema, produced by the qeval plugin's own loader, so prompts, targets,
few-shot settings and metrics stay lm-eval's config.  qeval runs its plugin task
(``qeval_<name>``) on the in-memory model loaded by qeval, through the same
``evaluate_lm_eval`` call the sweep uses.  Both numbers are printed side by side,
with every subtask of a group compared as well, and item by item: the share of items
whose every per-request score (each choice's log-likelihood) agrees to 1e-6, so an
equal accuracy cannot hide different predictions that happen to balance out.

    python benchmarks/lmeval_parity.py --model smollm2-135m --limit 50 \\
        --limits qeval_mmlu=5,qeval_wikitext=3
    python benchmarks/lmeval_parity.py --tasks qeval_arc_easy,qeval_mmlu --limit 20

``--limit`` is lm-eval's: per task, so for MMLU per subject.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from hydra import compose, initialize_config_dir

from qeval.cli import CONF_DIR
from qeval.data import local_file
from qeval.eval import harness
from qeval.eval.registry import BUILTIN_TASKS_DIR, import_plugin_file
from qeval.models.loading import load_model, resolve_pretrained_path

Loader = Callable[..., Any]  # custom_dataset function: (**kwargs) -> datasets.DatasetDict


def plugin_module(relative: str) -> ModuleType:
    """A task plugin's helper module (``tasks/<relative>``), imported by file path like lm-eval does."""
    return import_plugin_file(BUILTIN_TASKS_DIR / relative)


def same_loader(relative: str, function: str) -> Callable[[str], Loader | None]:
    """Every lm-eval task of the pair reads its rows through the plugin's loader ``function``."""
    return lambda _task: getattr(plugin_module(relative), function)


def mmlu_loader(task: str) -> Loader | None:
    """lm-eval's ``mmlu_<subject>`` reads the local CSVs of <subject>; None when they are not local."""
    subject = task.removeprefix("mmlu_")
    if local_file(f"mmlu/test/{subject}_test.csv") is None:
        return None
    return functools.partial(plugin_module("nlp/mmlu/utils.py").load_mmlu, subject=subject)


@dataclass(frozen=True)
class Pair:
    """A qeval plugin and the lm-eval task or group it must score identically."""

    reference: str  # lm-eval's registered task or group
    local: Callable[[str], Loader | None]  # lm-eval task name -> loader of its local rows (None: skip it)
    metrics: tuple[str, ...]
    # lm-eval task name -> qeval's, where it is not "qeval_" + lm-eval's (BIG-bench's long names)
    renamed: tuple[tuple[str, str], ...] = ()

    def ours(self, name: str) -> str:
        return dict(self.renamed).get(name, f"qeval_{name}")


# qeval task -> the lm-eval task it mirrors (the qeval name is "qeval_" + lm-eval's, subtasks too)
PAIRS: dict[str, Pair] = {
    "qeval_lambada_openai": Pair(
        "lambada_openai", same_loader("nlp/lambada/utils.py", "load_lambada_openai"), ("acc", "perplexity")
    ),
    "qeval_arc_easy": Pair("arc_easy", same_loader("nlp/arc/utils.py", "load_arc_easy"), ("acc", "acc_norm")),
    "qeval_arc_challenge": Pair(
        "arc_challenge", same_loader("nlp/arc/utils.py", "load_arc_challenge"), ("acc", "acc_norm")
    ),
    "qeval_mmlu": Pair("mmlu", mmlu_loader, ("acc",)),
    **{
        f"qeval_ethics_{subset}": Pair(
            f"ethics_{subset}", same_loader("ethics/hendrycks_ethics/utils.py", f"load_ethics_{subset}"), ("acc",)
        )
        for subset in ("cm", "deontology", "justice", "utilitarianism", "virtue")
    },
    "qeval_piqa": Pair("piqa", same_loader("nlp/piqa/utils.py", "load_piqa"), ("acc", "acc_norm")),
    "qeval_winogrande": Pair("winogrande", same_loader("nlp/winogrande/utils.py", "load_winogrande"), ("acc",)),
    "qeval_boolq": Pair("boolq", same_loader("nlp/boolq/utils.py", "load_boolq"), ("acc",)),
    "qeval_strategyqa": Pair(
        "bigbench_strategyqa_multiple_choice",
        same_loader("emergent/strategyqa/utils.py", "load_strategyqa_mc"),
        ("acc",),
        renamed=(("bigbench_strategyqa_multiple_choice", "qeval_strategyqa"),),
    ),
    "qeval_truthfulqa_mc1": Pair(
        "truthfulqa_mc1", same_loader("ethics/truthfulqa/utils.py", "load_truthfulqa_mc"), ("acc",)
    ),
    "qeval_truthfulqa_mc2": Pair(
        "truthfulqa_mc2", same_loader("ethics/truthfulqa/utils.py", "load_truthfulqa_mc"), ("acc",)
    ),
    "qeval_wikitext": Pair(
        "wikitext",
        same_loader("nlp/wikitext/utils.py", "load_wikitext"),
        ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    ),
}


def reference_item(tm, name: str, local: Callable[[str], Loader | None], skipped: list[str]) -> Any:
    """lm-eval's registered task/group/tag ``name`` with each task's dataset replaced by its local loader.

    Groups are rebuilt from lm-eval's own group YAML (same aggregation), keeping
    only the subtasks that have local data (``skipped`` collects the others, e.g.
    ``mmlu_professional_law``).  Returns a Task, a Group, a list of Tasks (a tag)
    or None (nothing local).
    """
    from lm_eval.api.group import Group
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index[name]
    kind = entry.kind.name
    if kind == "TAG":
        items = [reference_item(tm, t, local, skipped) for t in sorted(entry.tags)]
        return [t for t in items if t is not None]
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    if kind == "GROUP":
        group = Group.from_config({k: v for k, v in cfg.items() if k in GROUP_FIELD_NAMES and k != "task"})
        for child in cfg["task"]:
            item = reference_item(tm, child, local, skipped)
            for member in item if isinstance(item, list) else [item]:
                if member is not None:
                    group.add(member)
        return group
    loader = local(name)
    if loader is None:
        skipped.append(name)
        return None
    cfg["custom_dataset"] = loader  # the only change: where the rows come from
    return tm.load([cfg])["tasks"][name]


def lm_eval_reference(
    pretrained: str, pair: Pair, limit: int | None, batch_size: int, dtype: str = "float32"
) -> tuple[dict, list[str]]:
    """lm-eval's own task (or group) from the model folder; (lm-eval's output, skipped subtasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    skipped: list[str] = []
    item = reference_item(tm, pair.reference, pair.local, skipped)
    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": pretrained, "dtype": dtype},
        tasks=[item],
        limit=limit,
        batch_size=batch_size,
        device="cpu",
        num_fewshot=0,
        task_manager=tm,
        bootstrap_iters=1000,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return out, skipped


def qeval_run(model, tokenizer, task: str, limit: int | None, batch_size: int) -> tuple[dict, dict]:
    """qeval's ``evaluate_lm_eval`` (the sweep's call); (its metrics, lm-eval's full output behind them)."""
    captured: dict[str, Any] = {}
    original = harness.run_lm_eval

    def spy(*args: Any, **kwargs: Any) -> dict:
        captured["out"] = original(*args, **kwargs)
        return captured["out"]

    harness.run_lm_eval = spy  # evaluate_lm_eval looks it up in the module: keep its output too
    try:
        metrics = harness.evaluate_lm_eval(model, tokenizer, task, limit=limit, num_fewshot=0, batch_size=batch_size)
    finally:
        harness.run_lm_eval = original
    return metrics, captured["out"]


def equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def compare_subtasks(ours: dict, ref: dict, pair: Pair) -> tuple[int, int]:
    """(equal, compared) over every lm-eval result entry: the task, or a group's subgroups and subtasks."""
    n_equal = n = 0
    metrics = pair.metrics
    for name, values in ref["results"].items():
        mine = ours["results"].get(pair.ours(name), {})
        for metric in (m for m in metrics if f"{m},none" in values):
            n += 1
            n_equal += equal(float(mine.get(f"{metric},none", float("nan"))), float(values[f"{metric},none"]))
    return n_equal, n


def _per_item(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id -> the item's per-request scores (a choice's log-likelihood, a window's NLL); a
    generated answer's filtered text is compared as it is."""
    out: dict[int, list] = {}
    for s in samples:
        values = []
        for resp in s["filtered_resps"]:
            values.append(float(resp[0]) if isinstance(resp, (list, tuple)) else resp)
        out[int(s["doc_id"])] = values
    return out


def compare_items(ours: dict, ref: dict, pair: Pair) -> tuple[int, int]:
    """(items whose every per-request score agrees to 1e-6 relative, items compared), over
    every subtask: the item-level check behind an equal metric."""
    same = n = 0
    for name, samples in ref.get("samples", {}).items():
        mine = _per_item(ours.get("samples", {}).get(pair.ours(name), []))
        for doc_id, values in _per_item(samples).items():
            n += 1
            other = mine.get(doc_id)
            same += (
                other is not None
                and len(other) == len(values)
                and all(
                    a == b if isinstance(b, str) else abs(a - b) <= 1e-6 * max(1.0, abs(b))
                    for a, b in zip(other, values)
                )
            )
    return same, n


def table_row(row: tuple) -> str:
    q, r, lim, m, a, b, na, nb, (se, sn), (ie, i_n), _skipped, ta, tb = row
    return (
        f"| {q} | {r} | {lim} | {m} | {a:.6f} | {b:.6f} | {equal(a, b)} | {na} / {nb} | {se}/{sn} "
        f"| {ie}/{i_n} | {ta:.1f} | {tb:.1f} |"
    )


def parse_limits(text: str | None) -> dict[str, int]:
    if not text:
        return {}
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {name.strip(): int(value) for name, value in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--tasks",
        default=",".join(PAIRS),
        help=f"comma-separated qeval tasks to compare (default: all of {', '.join(PAIRS)})",
    )
    parser.add_argument("--limit", type=int, default=None, help="items per task (per subject for MMLU)")
    parser.add_argument("--limits", default=None, help="per-task limits overriding --limit, e.g. qeval_mmlu=5")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    chosen = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(PAIRS)}")
    limits = parse_limits(args.limits)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"model={args.model}"])
    pretrained = resolve_pretrained_path(cfg.model, cfg.cache_dir)
    loaded = load_model(cfg.model, cfg.cache_dir)
    rows = []
    for task in chosen:
        pair, limit = PAIRS[task], limits.get(task, args.limit)
        t0 = time.perf_counter()
        ours, ours_out = qeval_run(loaded.model, loaded.tokenizer, task, limit, args.batch_size)
        t1 = time.perf_counter()
        ref_out, skipped = lm_eval_reference(pretrained, pair, limit, args.batch_size)
        t2 = time.perf_counter()
        ref = ref_out["results"][pair.reference]
        n_ref = sum(int(c["effective"]) for c in ref_out["n-samples"].values())
        sub = compare_subtasks(ours_out, ref_out, pair)
        items = compare_items(ours_out, ref_out, pair)
        for metric in pair.metrics:
            rows.append(
                (
                    task,
                    pair.reference,
                    limit,
                    metric,
                    ours[metric],
                    float(ref[f"{metric},none"]),
                    int(ours["samples"]),
                    n_ref,
                    sub,
                    items,
                    skipped,
                    t1 - t0,
                    t2 - t1,
                )
            )
        print(f"{task}: qeval {t1 - t0:.1f}s, lm-eval {t2 - t1:.1f}s", flush=True)
        for row in rows[-len(pair.metrics) :]:  # as each task finishes: a long run interrupted keeps these
            print("done " + table_row(row), flush=True)
    print(f"\nmodel {args.model}, batch size {args.batch_size}\n")
    print(
        "| qeval task | lm-eval task | limit | metric | qeval | lm-eval | equal | n qeval / lm-eval "
        "| all results equal | items with equal scores | qeval s | lm-eval s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(table_row(row))
    for r, skipped in {row[1]: row[10] for row in rows if row[10]}.items():
        print(f"\n{r}: left out of lm-eval's group (no local data): {', '.join(sorted(set(skipped)))}")


if __name__ == "__main__":
    main()
