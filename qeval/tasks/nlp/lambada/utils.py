"""Data loader for the qeval LAMBADA task: the local file, else its pinned download (qeval.data_sources)."""

from __future__ import annotations

from typing import Any

import datasets

from qeval.data import data_file


def load_lambada_openai(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    path = data_file("lambada/lambada_test.jsonl", qeval_data_dir)
    return datasets.load_dataset("json", data_files={"test": str(path)})
