"""Where evaluation and calibration data come from.

Offline first: every dataset has a local file under the data directory
(``QEVAL_DATA_DIR``, or ``../shared/data`` beside the checkout when it
exists) and a Hub equivalent used only when the local file is absent.  A user
points ``QEVAL_DATA_DIR`` (or ``data_dir=``) at their own copies in the same
layout.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_REPO_ROOT = Path(__file__).resolve().parent.parent


class DataNotFoundError(FileNotFoundError):
    """A task needs data that is neither local nor reachable."""


def data_dir(override: str | None = None) -> Path | None:
    """The local data directory, or None when there is none."""
    for candidate in (override, os.environ.get("QEVAL_DATA_DIR")):
        if candidate:
            return Path(candidate).expanduser().resolve()
    for default in (Path.cwd().parent / "shared" / "data", _REPO_ROOT.parent / "shared" / "data"):
        if default.is_dir():
            return default.resolve()
    return None


def offline() -> bool:
    """Whether the user switched the Hub off (then a missing local file is an error, not a download)."""
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("QEVAL_OFFLINE") == "1"


def local_file(relative: str, override: str | None = None) -> Path | None:
    root = data_dir(override)
    if root is None:
        return None
    path = root / relative
    return path if path.is_file() else None


@dataclass(frozen=True)
class TextDataset:
    """A corpus for perplexity or calibration: rows of text."""

    local: str  # path under the data directory; rows are its non-empty lines
    hub_path: str
    hub_name: str | None
    hub_split: str
    hub_field: str = "text"

    def rows(self, override: str | None = None) -> list[str]:
        path = Path(self.local) if Path(self.local).is_absolute() else local_file(self.local, override)
        if path is not None:
            text = path.read_text(encoding="utf-8")
            return [line for line in text.splitlines() if line.strip()]
        if offline():
            raise DataNotFoundError(
                f"{self.local} not found under the data directory ({data_dir(override)}) and the Hub is "
                "disabled (HF_HUB_OFFLINE/QEVAL_OFFLINE); set QEVAL_DATA_DIR to a folder holding it"
            )
        import datasets

        ds = datasets.load_dataset(self.hub_path, self.hub_name, split=self.hub_split)
        return [r for r in ds[self.hub_field] if r.strip()]


TEXT_DATASETS: dict[str, TextDataset] = {
    # WikiText-2 raw test: the local file has the HF rows without the empty ones
    "wikitext2": TextDataset(
        "wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt", "Salesforce/wikitext", "wikitext-2-raw-v1", "test"
    ),
    "wikitext2_train": TextDataset(
        "wikitext2/wiki.train.raw.first1MB.kent_apex.txt", "Salesforce/wikitext", "wikitext-2-raw-v1", "train"
    ),
    "c4_sample": TextDataset("c4_sample/c4_sample.exllamav2.txt", "allenai/c4", "en", "validation"),
}


def text_dataset(name: str) -> TextDataset:
    """A registered corpus by name, or any text file by path (one row per non-empty line)."""
    if name in TEXT_DATASETS:
        return TEXT_DATASETS[name]
    path = Path(name).expanduser()
    if path.is_file():
        return TextDataset(str(path.resolve()), "", None, "")
    raise DataNotFoundError(
        f"unknown text dataset {name!r}: use one of {', '.join(sorted(TEXT_DATASETS))} or the path of a text file"
    )


def check_available(name: str, override: str | None = None) -> None:
    """Fail early, before a model loads, when a dataset can't be had."""
    ds = text_dataset(name)
    if Path(ds.local).is_absolute():
        return
    if local_file(ds.local, override) is None and offline():
        raise DataNotFoundError(
            f"dataset {name!r} needs {ds.local} under the data directory ({data_dir(override)}), "
            "and the Hub is disabled; set QEVAL_DATA_DIR"
        )


def load_text(name: str, override: str | None = None) -> str:
    """The corpus joined with blank lines, the quantization papers' convention."""
    return "\n\n".join(text_dataset(name).rows(override))


def calibration_for(cfg: Any, tokenizer) -> list[torch.Tensor]:
    """The calibration batches a config's ``calib`` group asks for (one recipe for the sweep,
    qeval-stats and the benchmarks)."""
    c = cfg.calib
    return calibration_batches(tokenizer, c.dataset, c.nsamples, c.seqlen, c.seed, cfg.data_dir)


_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def tokenized_corpus(tokenizer, dataset: str, data_dir: str | None = None) -> torch.Tensor:
    """Token ids of a whole corpus, cached per process by content: the tokenizer and the
    sha256 of the text, so every cell of a sweep (perplexity and calibration alike) tokenizes
    a corpus once, and an edited file is tokenized again."""
    text = load_text(dataset, data_dir)
    tok_id = (
        f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}#{len(tokenizer)}"
        f":bos={getattr(tokenizer, 'add_bos_token', None)}"
    )
    key = (tok_id, hashlib.sha256(text.encode()).hexdigest())
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenizer(text, return_tensors="pt").input_ids[0]
    return _TOKEN_CACHE[key]


def calibration_batches(
    tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int, override: str | None = None
) -> list[torch.Tensor]:
    """``nsamples`` random windows of ``seqlen`` tokens from a corpus (GPTQ's recipe)."""
    ids = tokenized_corpus(tokenizer, dataset, override).unsqueeze(0)
    if ids.shape[1] <= seqlen:
        raise ValueError(f"calibration corpus {dataset!r} has {ids.shape[1]} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.shape[1] - seqlen, (nsamples,), generator=gen)
    return [ids[:, s : s + seqlen].clone() for s in starts.tolist()]  # never views of the cached corpus
