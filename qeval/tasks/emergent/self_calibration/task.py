"""Self-calibration (Qllm-Eval's emergent ability): calibration error of a multiple-choice task.

The study found self-calibration among the abilities that suffer most from
quantization.  This task runs a multiple-choice lm-eval task (default
``qeval_arc_easy``; any task with ``output_type: multiple_choice`` works,
groups such as ``qeval_mmlu`` included) with per-sample logging and computes
ECE and Brier score from the per-choice log-likelihoods
(:mod:`qeval.eval.calibration_error`).

Items (``ctx.keep_items``, one row per question; id ``"<subtask>/<doc_id>"``): ``correct``
(0/1; its mean is the reported ``acc``), ``confidence`` (the chosen answer's probability; its
mean is ``confidence``), ``brier`` (its mean is ``brier``), ``choice`` and ``gold`` (choice
indices) and ``answer`` (the chosen choice's text, cut short).  There is no ``ece`` column: ECE
is computed over confidence bins, not averaged over items, so the paired analysis compares
``correct`` (``item_outcome``).

Suite entry::

    self_calibration:
      task: qeval_self_calibration
      limit: 200
      params: {task: qeval_arc_easy, bins: 10}
"""

from __future__ import annotations

from typing import Any

from qeval.eval.calibration_error import calibration_items, calibration_scores
from qeval.eval.harness import run_lm_eval
from qeval.eval.registry import (
    NativeTask,
    TaskContext,
    TaskDataError,
    TaskParamError,
    register_task,
    short_text,
    task_exists,
)


@register_task
class SelfCalibration(NativeTask):
    name = "qeval_self_calibration"
    family = "emergent"
    primary_metric = "ece"
    higher_is_better = False
    # ECE bins the items (it is no mean over them): the paired analysis compares correctness
    item_outcome = "correct"
    item_binary = True
    item_higher_is_better = True
    description = "ECE and Brier score of a multiple-choice task's answer probabilities"

    def __init__(self, task: str = "qeval_arc_easy", bins: int = 10, num_fewshot: int | None = None) -> None:
        if bins < 1:
            raise TaskParamError(f"bins={bins}: need at least 1")
        super().__init__(task=task, bins=bins, num_fewshot=num_fewshot)
        self.task, self.bins, self.num_fewshot = task, bins, num_fewshot

    def check_available(self, data_dir: str | None = None, include: tuple[str, ...] = ()) -> None:
        if not task_exists(self.task, tuple(include)):
            raise TaskDataError(f"qeval_self_calibration: params.task={self.task!r} is not an lm-eval task")

    def data_files(self, include: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The files of the multiple-choice task it runs."""
        from qeval.eval.registry import lm_eval_task_files

        return tuple(lm_eval_task_files(self.task, include))

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        shots = self.num_fewshot if self.num_fewshot is not None else ctx.extra.get("num_fewshot")
        out = run_lm_eval(
            ctx.scorer if ctx.scorer is not None else ctx.model,
            ctx.tokenizer,
            self.task,
            limit=ctx.limit,
            num_fewshot=shots,
            batch_size=ctx.extra.get("batch_size", 16),
            seed=ctx.seed,
            include=tuple(ctx.extra.get("include", ())),
            log_samples=True,
            data_dir=ctx.data_dir,
        )
        lls: list[list[float]] = []
        gold: list[int] = []
        ids: list[str] = []
        choices: list[list[str]] = []
        for subtask, samples in out["samples"].items():
            for s in samples:
                if not isinstance(s.get("target"), int) or not s.get("filtered_resps"):
                    raise TaskDataError(
                        f"qeval_self_calibration needs a multiple-choice task; {subtask!r} "
                        "logs no per-choice log-likelihoods"
                    )
                lls.append([float(r[0]) for r in s["filtered_resps"]])
                gold.append(int(s["target"]))
                filt = s.get("filter") or "none"  # a task with several filters logs each doc once per filter
                ids.append(f"{subtask}/{s['doc_id']}" + ("" if filt == "none" else f"/{filt}"))
                choices.append([str(a[1]) if len(a) > 1 else "" for a in s.get("arguments") or []])
        metrics = calibration_scores(lls, gold, self.bins, seed=ctx.seed).as_metrics()
        items = calibration_items(lls, gold)
        answers = [cs[c] if c < len(cs) else str(c) for cs, c in zip(choices, items["choice"])]
        ctx.keep_items(id=ids, **items, answer=[short_text(a) for a in answers])
        return metrics
