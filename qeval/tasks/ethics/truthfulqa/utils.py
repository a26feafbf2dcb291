"""Data loader and scoring helpers for qeval's TruthfulQA multiple-choice tasks.

lm-eval's ``truthfulqa_mc1``/``truthfulqa_mc2`` read the Hub's ``truthful_qa``
(config ``multiple_choice``, split ``validation``): ``question`` plus
``mc1_targets``/``mc2_targets`` as ``{choices, labels}``.  That dataset was built
from TruthfulQA's ``mc_task.json``, whose targets are ``{answer text: 0/1}``
objects; the Hub builder turned each object into its keys (choices) and values
(labels) in file order, and so does :func:`convert_item`.  The order matters:
mc1's target is choice 0, the one true answer, which ``mc_task.json`` lists first.

Scoring of mc2 is lm-eval's own function, imported here so that the YAML can
name it next to the loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.truthfulqa.utils import process_results_mc2  # noqa: F401  (named by the mc2 YAML)

from qeval.data import data_file

HUB_PATH, HUB_NAME = "truthfulqa/truthful_qa", "multiple_choice"
_TARGETS = {"choices": datasets.List(datasets.Value("string")), "labels": datasets.List(datasets.Value("int32"))}
FEATURES = datasets.Features({"question": datasets.Value("string"), "mc1_targets": _TARGETS, "mc2_targets": _TARGETS})


def convert_item(item: dict[str, Any]) -> dict[str, Any]:
    """One ``mc_task.json`` item in the Hub's multiple_choice schema."""
    return {
        "question": item["question"],
        **{
            key: {"choices": list(item[key]), "labels": [int(v) for v in item[key].values()]}
            for key in ("mc1_targets", "mc2_targets")
        },
    }


def read_mc_task(path: Path) -> list[dict[str, Any]]:
    """Every item of TruthfulQA's ``mc_task.json``, converted, in file order."""
    return [convert_item(item) for item in json.loads(path.read_text(encoding="utf-8"))]


def load_truthfulqa_mc(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """The ``validation`` split (TruthfulQA's only one) from ``<data dir>/truthfulqa/mc_task.json``
    (or its pinned download)."""
    path = data_file("truthfulqa/mc_task.json", qeval_data_dir)
    rows = read_mc_task(path)
    return datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in FEATURES}, features=FEATURES)}
    )
