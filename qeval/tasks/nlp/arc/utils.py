"""Data loaders for the qeval ARC tasks: AI2's jsonl files, converted to the Hub schema.

lm-eval's ``arc_easy``/``arc_challenge`` prompts read the ``allenai/ai2_arc``
schema (``id``, ``question``, ``choices{text,label}``, ``answerKey``), while AI2's
release nests the question (``question{stem,choices[{text,label}]}``).  The
loaders flatten the AI2 rows into that schema, so the lm-eval prompt, target and
metrics apply unchanged.  AI2's Train/Dev files are read when they sit beside
the test file (lm-eval draws few-shot examples from ``train``); otherwise those
splits are empty and only zero-shot evaluation is possible offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file
from qeval.eval.hub_schema import to_dataset

HUB_PATH = "allenai/ai2_arc"  # the schema the rows follow
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "choices": {"text": datasets.List(datasets.Value("string")), "label": datasets.List(datasets.Value("string"))},
        "answerKey": datasets.Value("string"),
    }
)
# lm-eval split name -> AI2 file suffix
SPLIT_FILES = {"test": "Test", "train": "Train", "validation": "Dev"}


def convert_row(row: dict[str, Any]) -> dict[str, Any]:
    """One AI2 jsonl row in the ``allenai/ai2_arc`` schema (choice order and labels kept)."""
    choices = row["question"]["choices"]
    return {
        "id": row["id"],
        "question": row["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": row["answerKey"],
    }


def read_arc_file(path: Path) -> list[dict[str, Any]]:
    """Every row of an AI2 ARC jsonl file, converted (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        return [convert_row(json.loads(line)) for line in f if line.strip()]


def load_arc(subset: str, qeval_data_dir: str | None = None) -> datasets.DatasetDict:
    """``subset`` (``ARC-Easy``/``ARC-Challenge``) from ``<data dir>/arc/`` (or the test file's
    pinned download).

    The DatasetDict always has lm-eval's three splits (the YAML names them);
    those without a local file are empty.
    """
    test = data_file(f"arc/{subset}-Test.jsonl", qeval_data_dir)
    splits = {}
    for split, suffix in SPLIT_FILES.items():
        path = test.with_name(f"{subset}-{suffix}.jsonl")
        rows = read_arc_file(path) if path.is_file() else []
        splits[split] = to_dataset(rows, FEATURES)
    return datasets.DatasetDict(splits)


def load_arc_easy(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return load_arc("ARC-Easy", qeval_data_dir)


def load_arc_challenge(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return load_arc("ARC-Challenge", qeval_data_dir)
