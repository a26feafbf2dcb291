"""Rows of a local data file as a ``datasets.Dataset`` in the Hub schema lm-eval's prompts read.

qeval's task plugins mirror lm-eval's registered tasks with only the data source replaced:
each plugin's loader parses its local file (AI2 jsonl, Hendrycks CSV, llm-foundry ICL jsonl)
into the rows the Hub dataset lm-eval reads would give, so lm-eval's prompt, target and
metric templates apply unchanged.  These two helpers are what every such loader shares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every object of a JSON-lines file, in file order (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_dataset(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    """Rows as a Dataset with the Hub's features (also when there are no rows)."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
