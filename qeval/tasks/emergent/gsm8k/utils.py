"""Data loader for the qeval GSM8K task: local file first, Hub otherwise."""

from __future__ import annotations

from typing import Any

import datasets

from qeval.data import local_file


def load_gsm8k(**_: Any) -> datasets.DatasetDict:
    path = local_file("gsm8k/test.jsonl")
    if path is not None:
        return datasets.load_dataset("json", data_files={"test": str(path)})
    return datasets.load_dataset("openai/gsm8k", "main")
