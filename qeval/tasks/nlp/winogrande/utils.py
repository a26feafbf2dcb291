"""Data loader for qeval's WinoGrande task: llm-foundry's schema jsonl in the Hub schema.

lm-eval's ``winogrande`` reads ``allenai/winogrande`` (``winogrande_xl``: ``sentence`` with
one ``_``, ``option1``, ``option2``, ``answer`` "1"/"2") and scores it by *partial
evaluation*: each option fills the blank in the context (``sentence[:blank] + option``)
and the model's log-likelihood of the same continuation (the text after the blank) decides.
The shared file is llm-foundry's copy of the dev split,
``{"context_options": [context + option1, context + option2], "continuation", "gold"}``,
which is that split already made.  The loader rebuilds the Hub row: the context is the two
context options' common prefix cut back to a word boundary (so ``option1``/``option2`` are
whole words, e.g. "blanket"/"bed" and not "lanket"/"ed"), ``sentence`` = context + ``_`` +
" " + continuation.  Whatever the cut, lm-eval's choices ``sentence[:blank] + option`` are
exactly the file's context options and its target ``sentence[blank + 1:].strip()`` is the
continuation, so the scores are those of the file's own split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file
from qeval.eval.hub_schema import read_jsonl, to_dataset

HUB_PATH, HUB_NAME = "allenai/winogrande", "winogrande_xl"  # the schema the rows follow
FEATURES = datasets.Features(
    {
        "sentence": datasets.Value("string"),
        "option1": datasets.Value("string"),
        "option2": datasets.Value("string"),
        "answer": datasets.Value("string"),
    }
)


def convert_row(row: dict[str, Any]) -> dict[str, Any]:
    first, second = row["context_options"]
    common = os.path.commonprefix([first, second])
    cut = common.rfind(" ") + 1 if common not in (first, second) else len(common)
    context = first[:cut]
    if "_" in context or "_" in row["continuation"]:
        raise ValueError(f"a WinoGrande row whose text holds '_' (the blank marker): {row!r:.120}")
    return {
        "sentence": f"{context}_ {row['continuation'].strip()}",
        "option1": first[cut:],
        "option2": second[cut:],
        "answer": str(int(row["gold"]) + 1),
    }


def read_winogrande(path: Path) -> list[dict[str, Any]]:
    return [convert_row(r) for r in read_jsonl(path)]


def load_winogrande(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``validation`` from ``<data dir>/winogrande/`` (or its pinned download); ``train`` empty."""
    path = data_file("winogrande/winogrande_dev.llmfoundry.jsonl", qeval_data_dir)
    return datasets.DatasetDict(
        {"validation": to_dataset(read_winogrande(path), FEATURES), "train": to_dataset([], FEATURES)}
    )


# lm-eval's partial evaluation: the gold option's index as the "text" (lm-eval then scores
# each choice as a context with the shared continuation), the options in the blank as choices
def doc_to_text(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
