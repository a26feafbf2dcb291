"""Data loader for the qeval MMLU subjects: Hendrycks' CSV files, converted to the Hub schema.

lm-eval's ``mmlu_<subject>`` prompts read the ``cais/mmlu`` schema (``question``,
``subject``, ``choices`` as a list of four strings, ``answer`` as the index 0-3 of
the letter).  The original release is one header-less CSV per subject and split
(``question, A, B, C, D, answer letter``), which is what ``cais/mmlu``'s own
builder parsed with ``csv.reader``; the same parse here keeps every string
byte-identical to the Hub rows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file
from qeval.eval.hub_schema import to_dataset

HUB_PATH = "cais/mmlu"  # the schema the rows follow
LETTERS = ("A", "B", "C", "D")
FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=list(LETTERS)),
    }
)
# lm-eval split name -> Hendrycks folder/suffix (MMLU's "val" split is not used by lm-eval's mmlu)
SPLITS = {"test": "test", "dev": "dev"}


def read_mmlu_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    """Rows of one Hendrycks MMLU CSV in the ``cais/mmlu`` schema."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    bad = [i for i, r in enumerate(rows) if len(r) != 6 or r[5] not in LETTERS]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not 'question, A, B, C, D, answer letter'")
    return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": LETTERS.index(r[5])} for r in rows]


def load_mmlu(subject: str, qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``test`` and ``dev`` (few-shot) splits of one subject from ``<data dir>/mmlu/`` (or the
    files' pinned downloads).

    ``subject`` comes from the task's ``dataset_kwargs`` (lm-eval passes those to a
    ``custom_dataset`` function, not ``dataset_name``).
    """
    paths = {
        split: data_file(f"mmlu/{folder}/{subject}_{folder}.csv", qeval_data_dir) for split, folder in SPLITS.items()
    }
    return datasets.DatasetDict(
        {split: to_dataset(read_mmlu_csv(path, subject), FEATURES) for split, path in paths.items()}
    )
