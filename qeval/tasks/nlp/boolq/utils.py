"""Data loader for qeval's BoolQ task: llm-foundry's ICL jsonl in the Hub schema.

lm-eval's ``boolq`` reads ``aps/super_glue`` (config ``boolq``: ``question``, ``passage``,
``idx``, ``label``) with the prompt ``"{{passage}}\\nQuestion: {{question}}?\\nAnswer:"``.
The shared file is llm-foundry's copy of the dev split,
``{"query": "Passage: <passage>\\nQuestion: <question>?", "choices": ["no", "yes"], "gold"}``:
the loader splits ``query`` at its last ``"\\nQuestion: "`` (a passage may contain the
phrase) and drops the fixed ``"Passage: "`` prefix and the final ``"?"``, so lm-eval's
prompt applies; ``idx`` is the row's position.  No train split offline: zero-shot only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from qeval.data import data_file
from qeval.eval.hub_schema import read_jsonl, to_dataset

HUB_PATH, HUB_NAME = "aps/super_glue", "boolq"  # the schema the rows follow
FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "passage": datasets.Value("string"),
        "idx": datasets.Value("int32"),
        "label": datasets.Value("int32"),
    }
)
PASSAGE, QUESTION = "Passage: ", "\nQuestion: "


def convert_row(row: dict[str, Any], idx: int) -> dict[str, Any]:
    query = row["query"]
    passage, sep, question = query.rpartition(QUESTION)
    if not (sep and passage.startswith(PASSAGE) and question.endswith("?")) or row["choices"] != ["no", "yes"]:
        raise ValueError(f"not an llm-foundry BoolQ row ('Passage: ...\\nQuestion: ...?', no/yes): {row!r:.120}")
    return {"question": question[:-1], "passage": passage[len(PASSAGE) :], "idx": idx, "label": int(row["gold"])}


def read_boolq(path: Path) -> list[dict[str, Any]]:
    return [convert_row(r, i) for i, r in enumerate(read_jsonl(path))]


def load_boolq(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``validation`` from ``<data dir>/boolq/`` (or its pinned download); ``train`` empty."""
    path = data_file("boolq/boolq_dev.llmfoundry.jsonl", qeval_data_dir)
    return datasets.DatasetDict(
        {"validation": to_dataset(read_boolq(path), FEATURES), "train": to_dataset([], FEATURES)}
    )
