"""Data loader for the qeval LAMBADA task: local file first, Hub otherwise."""

from __future__ import annotations

from typing import Any

import datasets

from qeval.data import local_file


def load_lambada_openai(**_: Any) -> datasets.DatasetDict:
    path = local_file("lambada/lambada_test.jsonl")
    if path is not None:
        return datasets.load_dataset("json", data_files={"test": str(path)})
    return datasets.load_dataset("EleutherAI/lambada_openai", "default")
