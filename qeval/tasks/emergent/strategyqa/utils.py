"""Data loaders for qeval's StrategyQA tasks: llm-foundry's copy of BIG-bench ``strategyqa``.

The shared file is ``{"query": "Q: <question>\\nA:", "choices": ["Yes", "No"], "gold"}``
per item (2,289 items, BIG-bench's zero-shot form; no facts, decompositions or rationales).

* Multiple choice (:func:`load_strategyqa_mc`): the rows in the schema of ``hails/bigbench``
  (config ``strategyqa_zero_shot``), which lm-eval's ``bigbench_strategyqa_multiple_choice``
  reads: ``inputs`` = the query, ``multiple_choice_targets`` = the choices,
  ``multiple_choice_scores`` = 1 for the gold choice; ``targets`` = the gold choice alone
  (BIG-bench's target also carries a one-sentence rationale, which the file does not have;
  the multiple-choice task never reads it).
* Chain of thought (:func:`load_strategyqa_cot`): ``question`` (the query without its
  ``Q: ``/``\\nA:`` frame) and ``answer`` ``yes``/``no``, for the generative task the
  Qllm-Eval study ran through OpenCompass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file
from qeval.eval.hub_schema import read_jsonl, to_dataset

RELATIVE = "strategyqa/bigbench_strategy_qa.llmfoundry.jsonl"
HUB_PATH, HUB_NAME = "hails/bigbench", "strategyqa_zero_shot"  # the multiple-choice rows' schema
MC_FEATURES = datasets.Features(
    {
        "idx": datasets.Value("int32"),
        "inputs": datasets.Value("string"),
        "targets": datasets.List(datasets.Value("string")),
        "multiple_choice_targets": datasets.List(datasets.Value("string")),
        "multiple_choice_scores": datasets.List(datasets.Value("int32")),
    }
)
COT_FEATURES = datasets.Features(
    {"idx": datasets.Value("int32"), "question": datasets.Value("string"), "answer": datasets.Value("string")}
)
PREFIX, SUFFIX = "Q: ", "\nA:"


def _checked(row: dict[str, Any]) -> dict[str, Any]:
    if not (row["query"].startswith(PREFIX) and row["query"].endswith(SUFFIX)) or row["choices"] != ["Yes", "No"]:
        raise ValueError(f"not an llm-foundry StrategyQA row ('Q: ...\\nA:', Yes/No): {row!r:.120}")
    return row


def read_mc(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(map(_checked, read_jsonl(path))):
        gold = int(r["gold"])
        rows.append(
            {
                "idx": i,
                "inputs": r["query"],
                "targets": [r["choices"][gold]],
                "multiple_choice_targets": list(r["choices"]),
                "multiple_choice_scores": [int(j == gold) for j in range(len(r["choices"]))],
            }
        )
    return rows


def read_cot(path: Path) -> list[dict[str, Any]]:
    return [
        {"idx": i, "question": r["query"][len(PREFIX) : -len(SUFFIX)], "answer": r["choices"][int(r["gold"])].lower()}
        for i, r in enumerate(map(_checked, read_jsonl(path)))
    ]


def load_strategyqa_mc(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """BIG-bench's single ``default`` split, as lm-eval's bigbench tasks name it."""
    return datasets.DatasetDict({"default": to_dataset(read_mc(data_file(RELATIVE, qeval_data_dir)), MC_FEATURES)})


def load_strategyqa_cot(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": to_dataset(read_cot(data_file(RELATIVE, qeval_data_dir)), COT_FEATURES)})
