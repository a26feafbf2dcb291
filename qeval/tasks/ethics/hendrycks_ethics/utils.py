"""Data loaders for qeval's five ETHICS tasks: Hendrycks' CSVs in the Hub schema.

lm-eval's ``ethics_cm``, ``ethics_deontology``, ``ethics_justice``,
``ethics_utilitarianism`` and ``ethics_virtue`` read ``EleutherAI/hendrycks_ethics``,
whose dataset script parses the release's ``<subset>/<prefix>_{train,test}.csv`` row by
row: commonsense ``label, input, is_short, edited``; deontology ``group_id, label,
scenario, excuse``; justice ``group_id, label, scenario``; utilitarianism ``activity,
baseline, rating`` (a header-less file of two scenarios, the first the more pleasant;
``rating`` empty); virtue ``group_id, label, scenario, trait`` (the CSV's scenario split
at `` [SEP] ``).  ``group_id`` numbers consecutive rows in fours (deontology, justice) and
fives (virtue): the groups the paper's exact-match metric scores together.  The loaders
parse the local test files the same way.  lm-eval draws few-shot examples from
``train``: that split is the ``*_train.csv`` beside the test file when present and empty
otherwise (the shared data has only the test files, so offline only zero-shot runs).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file
from qeval.eval.hub_schema import to_dataset

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


def _grouped(rows: list[dict[str, str]], size: int) -> list[dict[str, Any]]:
    """Rows with ``label`` as int and ``group_id`` = row index // ``size`` (the Hub script's numbering)."""
    return [{**r, "group_id": i // size, "label": int(r["label"])} for i, r in enumerate(rows)]


def read_deontology_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        return _grouped(list(csv.DictReader(f)), 4)


def read_justice_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        return _grouped(list(csv.DictReader(f)), 4)


def read_util_csv(path: Path) -> list[dict[str, Any]]:
    """The header-less utilitarianism file: (more pleasant, less pleasant) per row."""
    with path.open(encoding="utf-8", newline="") as f:
        return [{"activity": r[0], "baseline": r[1], "rating": ""} for r in csv.reader(f)]


def read_virtue_csv(path: Path) -> list[dict[str, Any]]:
    """Virtue rows with the scenario split at `` [SEP] `` into sentence and trait."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = _grouped(list(csv.DictReader(f)), 5)
    out = []
    for r in rows:
        scenario, trait = r["scenario"].split(" [SEP] ")
        out.append({"group_id": r["group_id"], "label": r["label"], "scenario": scenario, "trait": trait})
    return out


_INT, _STR = datasets.Value("int32"), datasets.Value("string")
# subset -> (file prefix, reader, the Hub config's features)
SUBSETS: dict[str, tuple[str, Callable[[Path], list[dict[str, Any]]], datasets.Features]] = {
    "commonsense": ("cm", read_cm_csv, FEATURES),
    "deontology": (
        "deontology",
        read_deontology_csv,
        datasets.Features({"group_id": _INT, "label": _INT, "scenario": _STR, "excuse": _STR}),
    ),
    "justice": ("justice", read_justice_csv, datasets.Features({"group_id": _INT, "label": _INT, "scenario": _STR})),
    "utilitarianism": ("util", read_util_csv, datasets.Features({"activity": _STR, "baseline": _STR, "rating": _STR})),
    "virtue": (
        "virtue",
        read_virtue_csv,
        datasets.Features({"group_id": _INT, "label": _INT, "scenario": _STR, "trait": _STR}),
    ),
}


def load_ethics(subset: str, qeval_data_dir: str | None = None) -> datasets.DatasetDict:
    """``test`` (and ``train`` when present) of one subset from ``<data dir>/ethics/<subset>/``
    (or the test file's pinned download)."""
    prefix, read, features = SUBSETS[subset]
    test = data_file(f"ethics/{subset}/{prefix}_test.csv", qeval_data_dir)
    train = test.with_name(f"{prefix}_train.csv")
    return datasets.DatasetDict(
        {
            "test": to_dataset(read(test), features),
            "train": to_dataset(read(train) if train.is_file() else [], features),
        }
    )


def load_ethics_cm(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return load_ethics("commonsense", qeval_data_dir)


def load_ethics_deontology(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return load_ethics("deontology", qeval_data_dir)


def load_ethics_justice(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return load_ethics("justice", qeval_data_dir)


def load_ethics_utilitarianism(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return load_ethics("utilitarianism", qeval_data_dir)


def load_ethics_virtue(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return load_ethics("virtue", qeval_data_dir)


# lm-eval's ethics_utilitarianism prompt: the pair in a per-item random order (seeded by the
# activity), label 1 when the more pleasant scenario comes first
def _util_doc(doc: dict[str, Any]) -> dict[str, Any]:
    order = [0, 1]
    random.Random(doc["activity"]).shuffle(order)
    pair = [doc["activity"], doc["baseline"]]
    return {"scenarios": [pair[order[0]], pair[order[1]]], "label": int(order.index(0) == 0)}


def util_doc_to_text(doc: dict[str, Any]) -> str:
    d = _util_doc(doc)
    return (
        f"Scenario 1: {d['scenarios'][0]}\nScenario 2: {d['scenarios'][1]}\n"
        "Question: Is Scenario 1 preferable?\nAnswer:"
    )


def util_doc_to_target(doc: dict[str, Any]) -> int:
    return int(_util_doc(doc)["label"])
