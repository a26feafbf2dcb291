"""Where evaluation and calibration data come from.

Offline first: every dataset has a local file under the data directory
(``QEVAL_DATA_DIR``, or ``../shared/data`` beside the checkout when it
exists).  A user points ``QEVAL_DATA_DIR`` (or ``data_dir=``) at their own
copies in the same layout, or materialises one with ``qeval-data fetch``.

When a file is missing there and downloads are allowed (neither
``QEVAL_OFFLINE=1`` nor ``HF_HUB_OFFLINE=1``), :func:`data_file` downloads it
from its pinned source in :data:`qeval.data_sources.SOURCES` into a cache in
the same layout (``$QEVAL_DATA_CACHE``, else ``<cache dir>/data``), checks its
sha256 and uses it: the same bytes as the shared folder, so the same numbers.
Preflight only asks :func:`available` (local, cached, or a known source), so it
downloads nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from qeval.data_sources import SOURCES, Source
from qeval.files import write_bytes_atomically
from qeval.offline import offline

log = logging.getLogger(__name__)

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


def local_file(relative: str, override: str | None = None) -> Path | None:
    root = data_dir(override)
    if root is None:
        return None
    path = root / relative
    return path if path.is_file() else None


# --------------------------------------------------------------------------- online fallback

FETCH_COMMAND = "qeval-data fetch"
_VERIFIED: set[tuple[Path, str]] = set()  # (path, sha256) pairs already checked in this process


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where downloaded data files are kept, in the data directory's layout."""
    explicit = os.environ.get("QEVAL_DATA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("QEVAL_CACHE_DIR") or Path.home() / ".cache" / "qeval"
    return Path(root).expanduser() / "data"


def has_content(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a file with this sha256 (checked once per process and file)."""
    key = (path.resolve(), sha256)
    if key in _VERIFIED:
        return True
    if path.is_file() and sha256_file(path) == sha256:
        _VERIFIED.add(key)
        return True
    return False


def cached_file(relative: str) -> Path | None:
    """The downloaded copy of a table file, when the cache holds the right content."""
    src = SOURCES.get(relative)
    if src is None:
        return None
    path = cache_dir() / relative
    return path if has_content(path, src.sha256) else None


def fetch_hint(relatives: Sequence[str], override: str | None = None) -> str:
    """The command that materialises these files for an offline machine."""
    root = data_dir(override)
    target = str(root) if root is not None else "DIR"
    files = " ".join(f"--file '{r}'" for r in relatives[:3]) + (" ..." if len(relatives) > 3 else "")
    return (
        f"fetch it on a machine with internet access: `{FETCH_COMMAND} --dir {target} {files}` "
        f"(or `{FETCH_COMMAND} --suite <suite> --dir {target}` for a whole suite), "
        f"then set QEVAL_DATA_DIR={target}"
    )


def missing_message(relatives: Sequence[str], override: str | None = None) -> str:
    """Why these files can't be had, naming them and how to get them."""
    root = data_dir(override)
    where = f"under the data directory ({root})" if root is not None else "(no data directory is set)"
    known = all(_matches(r) for r in relatives)
    if not known:
        return (
            f"{', '.join(relatives)} not found {where}, and qeval knows no online source for it: "
            "put it there in the same layout, or set QEVAL_DATA_DIR to a folder holding it"
        )
    why = " and downloads are off (QEVAL_OFFLINE/HF_HUB_OFFLINE)" if offline() else ""
    return f"{', '.join(relatives)} not found {where}{why}; {fetch_hint(relatives, override)}"


def _matches(pattern: str) -> bool:
    import fnmatch

    return pattern in SOURCES or any(fnmatch.fnmatchcase(rel, pattern) for rel in SOURCES)


def available(relative: str, override: str | None = None) -> bool:
    """Whether :func:`data_file` can give this file without failing: local, cached, or
    downloadable (a known source and downloads allowed).  Downloads nothing."""
    if local_file(relative, override) is not None or cached_file(relative) is not None:
        return True
    return relative in SOURCES and not offline()


def find_file(relative: str, override: str | None = None) -> Path | None:
    """The local file, else the cached download, else a fresh download when allowed; None when
    the file has no source or downloads are off."""
    path = local_file(relative, override) or cached_file(relative)
    if path is not None or relative not in SOURCES or offline():
        return path
    return fetch_file(relative, cache_dir())


def data_file(relative: str, override: str | None = None) -> Path:
    """Like :func:`find_file`, but a missing file is a :class:`DataNotFoundError` naming it
    and the fetch command."""
    path = find_file(relative, override)
    if path is None:
        raise DataNotFoundError(missing_message([relative], override))
    return path


# downloads ---------------------------------------------------------------------------------


def _get_url(url: str) -> bytes:
    """The bytes at a URL (http(s) or file://).  Tests replace this with a local stand-in."""
    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(url[len("file://") :])).read_bytes()
    request = urllib.request.Request(url, headers={"User-Agent": "qeval-data"})
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 (pinned https sources)
        return response.read()


def _hub_file(repo: str, filename: str, revision: str | None) -> bytes:
    """A Hub dataset file through huggingface_hub (HF_ENDPOINT, HF_TOKEN and the HF cache apply)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset", revision=revision)).read_bytes()


@lru_cache(maxsize=4)
def _archive(url: str, sha256: str | None) -> zipfile.ZipFile:
    """A zip/wheel, downloaded once per process and kept beside the data cache."""
    name = sha256 or hashlib.sha256(url.encode()).hexdigest()
    path = cache_dir() / ".archives" / f"{name}-{url.rsplit('/', 1)[-1]}"
    if not (path.is_file() and (sha256 is None or has_content(path, sha256))):
        blob = _get_url(url)
        if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
            raise DataNotFoundError(
                f"{url}: sha256 {hashlib.sha256(blob).hexdigest()} differs from the pinned {sha256}"
            )
        write_bytes_atomically(path, blob)
    return zipfile.ZipFile(io.BytesIO(path.read_bytes()))


def _crlf_to_lf_final_newline(blob: bytes) -> bytes:
    out = blob.replace(b"\r\n", b"\n")
    return out if out.endswith(b"\n") else out + b"\n"


def _ai2_arc_parquet_to_jsonl(blob: bytes) -> bytes:
    """AI2's ARC jsonl (compact JSON, AI2's key order) rebuilt from the Hub's parquet rows."""
    import pyarrow.parquet as pq

    lines = []
    for row in pq.read_table(io.BytesIO(blob)).to_pylist():
        choices = [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])]
        rec = {
            "id": row["id"],
            "question": {"stem": row["question"], "choices": choices},
            "answerKey": row["answerKey"],
        }
        lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
    return "".join(lines).encode("utf-8")


TRANSFORMS: dict[str, Callable[[bytes], bytes]] = {
    "crlf_to_lf_final_newline": _crlf_to_lf_final_newline,
    "ai2_arc_parquet_to_jsonl": _ai2_arc_parquet_to_jsonl,
}


def source_bytes(relative: str, src: Source) -> bytes:
    """The file's content from its source (or from ``$QEVAL_DATA_MIRROR/<relative>`` when a mirror
    of a data folder is configured), transformed as recorded, not yet verified."""
    mirror = os.environ.get("QEVAL_DATA_MIRROR")
    if mirror:
        base = mirror if "://" in mirror else Path(mirror).expanduser().resolve().as_uri()
        return _get_url(base.rstrip("/") + "/" + relative)
    if src.kind == "hub":
        blob = _hub_file(src.repo, src.path, src.revision)
    elif src.member:
        blob = _archive(src.url, src.archive_sha256).read(src.member)
    else:
        blob = _get_url(src.url)
    return TRANSFORMS[src.transform](blob) if src.transform else blob


def fetch_file(relative: str, root: Path) -> Path:
    """Download one table file into ``root/relative`` (atomically), checking its sha256.

    A file already there with the right content is not downloaded again."""
    src = SOURCES.get(relative)
    if src is None:
        raise DataNotFoundError(f"{relative}: qeval knows no online source for it")
    dest = root / relative
    if has_content(dest, src.sha256):
        return dest
    log.info("downloading %s from %s", relative, src.describe)
    try:
        blob = source_bytes(relative, src)
    except (OSError, KeyError, ValueError) as err:  # network, missing member, bad archive
        raise DataNotFoundError(f"{relative}: download from {src.describe} failed: {err}") from err
    except Exception as err:  # huggingface_hub's errors are not OSErrors in every version
        if type(err).__module__.startswith("huggingface_hub"):
            raise DataNotFoundError(f"{relative}: download from {src.describe} failed: {err}") from err
        raise
    digest = hashlib.sha256(blob).hexdigest()
    if digest != src.sha256:
        raise DataNotFoundError(
            f"{relative}: the content from {src.describe} has sha256 {digest}, not the pinned {src.sha256} "
            "(the upstream file changed?); not used"
        )
    write_bytes_atomically(dest, blob)
    _VERIFIED.add((dest.resolve(), src.sha256))
    return dest


@dataclass(frozen=True)
class TextDataset:
    """A corpus for perplexity or calibration: rows of text."""

    local: str  # path under the data directory; rows are its non-empty lines
    hub_path: str
    hub_name: str | None
    hub_split: str
    hub_field: str = "text"

    def rows(self, override: str | None = None) -> list[str]:
        """The corpus' non-empty lines: the local file, else its pinned download (same bytes);
        a corpus outside the source table falls back to its Hub dataset when online."""
        if Path(self.local).is_absolute():
            path: Path | None = Path(self.local)
        else:
            path = find_file(self.local, override)
        if path is not None:
            text = path.read_text(encoding="utf-8")
            return [line for line in text.splitlines() if line.strip()]
        if offline() or not self.hub_path or self.local in SOURCES:
            raise DataNotFoundError(missing_message([self.local], override))
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
    """Fail early, before a model loads, when a dataset can't be had (downloads nothing)."""
    ds = text_dataset(name)
    if Path(ds.local).is_absolute() or available(ds.local, override):
        return
    if ds.local not in SOURCES and ds.hub_path and not offline():
        return  # read from its Hub dataset
    raise DataNotFoundError(f"dataset {name!r} cannot be read: " + missing_message([ds.local], override))


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
