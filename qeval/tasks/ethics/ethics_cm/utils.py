"""Data loader for qeval's ETHICS commonsense task: Hendrycks' CSV in the Hub schema.

lm-eval's ``ethics_cm`` reads ``EleutherAI/hendrycks_ethics`` (config
``commonsense``: ``label`` int, ``input`` str, ``is_short`` bool, ``edited`` bool),
which is the release's ``cm_*.csv`` parsed row by row.  The loader parses the
local ``cm_test.csv`` the same way.  lm-eval draws few-shot examples from
``train``: that split is ``cm_train.csv`` when it sits beside the test file and
empty otherwise (the shared data has only the test file, so offline only
zero-shot runs).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file

HUB_PATH, HUB_NAME = "EleutherAI/hendrycks_ethics", "commonsense"  # the schema the rows follow
FEATURES = datasets.Features(
    {
        "label": datasets.Value("int32"),
        "input": datasets.Value("string"),
        "is_short": datasets.Value("bool"),
        "edited": datasets.Value("bool"),
    }
)
_BOOL = {"True": True, "False": False}


def read_cm_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of an ETHICS commonsense CSV (header ``label,input,is_short,edited``), typed."""
    with path.open(encoding="utf-8", newline="") as f:
        return [
            {
                "label": int(r["label"]),
                "input": r["input"],
                "is_short": _BOOL[r["is_short"]],
                "edited": _BOOL[r["edited"]],
            }
            for r in csv.DictReader(f)
        ]


def to_dataset(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    """Rows as a Dataset with the Hub's features (also when there are no rows)."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def load_ethics_cm(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``test`` (and ``train`` when present) from ``<data dir>/ethics/commonsense/`` (or the test
    file's pinned download)."""
    test = data_file("ethics/commonsense/cm_test.csv", qeval_data_dir)
    train = test.with_name("cm_train.csv")
    return datasets.DatasetDict(
        {
            "test": to_dataset(read_cm_csv(test), FEATURES),
            "train": to_dataset(read_cm_csv(train) if train.is_file() else [], FEATURES),
        }
    )
