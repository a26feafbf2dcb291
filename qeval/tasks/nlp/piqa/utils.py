"""Data loader for qeval's PIQA task: llm-foundry's ICL jsonl in the Hub schema.

lm-eval's ``piqa`` reads ``baber/piqa`` (``goal``, ``sol1``, ``sol2``, ``label`` int)
with the prompt ``"Question: {{goal}}\\nAnswer:"``.  The shared file is llm-foundry's copy of
the validation split, ``{"query": "Question: <goal>\\n", "choices": [sol1, sol2], "gold"}``:
the loader takes ``goal`` back out of ``query`` (the text between the fixed prefix and the
final newline), so lm-eval's own prompt, choices and metrics apply.  PIQA's train split
is not in the shared data: offline only zero-shot runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file
from qeval.eval.hub_schema import read_jsonl, to_dataset

HUB_PATH = "baber/piqa"  # the schema the rows follow
FEATURES = datasets.Features(
    {
        "goal": datasets.Value("string"),
        "sol1": datasets.Value("string"),
        "sol2": datasets.Value("string"),
        "label": datasets.Value("int32"),
    }
)
PREFIX, SUFFIX = "Question: ", "\n"


def convert_row(row: dict[str, Any]) -> dict[str, Any]:
    query = row["query"]
    if not (query.startswith(PREFIX) and query.endswith(SUFFIX)) or len(row["choices"]) != 2:
        raise ValueError(f"not an llm-foundry PIQA row ('Question: <goal>\\n' and two choices): {row!r:.120}")
    return {
        "goal": query[len(PREFIX) : -len(SUFFIX)],
        "sol1": row["choices"][0],
        "sol2": row["choices"][1],
        "label": int(row["gold"]),
    }


def read_piqa(path: Path) -> list[dict[str, Any]]:
    return [convert_row(r) for r in read_jsonl(path)]


def load_piqa(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``validation`` from ``<data dir>/piqa/`` (or its pinned download); ``train`` empty."""
    path = data_file("piqa/piqa_validation.llmfoundry.jsonl", qeval_data_dir)
    return datasets.DatasetDict(
        {"validation": to_dataset(read_piqa(path), FEATURES), "train": to_dataset([], FEATURES)}
    )
