"""Data loader for the qeval GSM8K task: the local file, else its pinned download (qeval.data_sources)."""

from __future__ import annotations

from typing import Any

import datasets

from qeval.data import data_file


def load_gsm8k(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    path = data_file("gsm8k/test.jsonl", qeval_data_dir)
    return datasets.load_dataset("json", data_files={"test": str(path)})
