"""Data loader for qeval's document-level WikiText-2 task, plus lm-eval's scoring helpers.

lm-eval's ``wikitext`` scores whole Wikipedia articles from
``EleutherAI/wikitext_document_level`` (``wikitext-2-raw-v1``): one row (``page``)
per article, built by that dataset's script from the raw ``wiki.test.raw`` lines:
a new page starts at every top-level heading (`` = Title = ``) and a page is its
lines joined with ``"\\n"``, the raw file's blank lines (a single space) included.

The shared file holds every non-blank line of the test split in order (CRLF-joined)
but not the 1,467 blank lines, so the pages are rebuilt here:

* page boundaries and all text lines are exact: 62 articles, the same lines in each;
* blank lines are put back where WikiText regularly has them, one before and one after
  every heading (any level). That restores 1,412 of the 1,467 blank lines; the other
  ~55 (e.g. between some paragraphs, or at the file's ends) cannot be located, so
  those spots have ``"\\n"`` where the Hub page has ``"\\n \\n"``.

Effect on lm-eval's metrics: word counts (lm-eval counts the whitespace-separated
pieces of ``page``) are identical, byte counts are about 110 bytes lower (0.01% of
1.29 MB), and the model sees one "\\n" instead of two at those ~55 spots, so perplexities
are close to, not identical with, lm-eval on the Hub data.  qeval's own perplexity
task (``kind: perplexity``) is a different protocol (fixed token windows) and is not
affected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

# lm-eval's own detokenizer and per-document scoring, named by the YAML
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

from qeval.data import data_file

LOCAL = "wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt"
HUB_PATH, HUB_NAME = "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"  # the schema rebuilt here
FEATURES = datasets.Features({"page": datasets.Value("string")})
BLANK = " "  # a blank line of wiki.*.raw
_HEADING = re.compile(r" (= )+.*( =)+ ")  # " = Title = ", " = = Section = = ", ...


def is_heading(line: str) -> bool:
    """A WikiText heading line of any level."""
    return _HEADING.fullmatch(line) is not None


def is_title(line: str) -> bool:
    """A top-level heading: the Hub builder's test (after collapsing '= =' runs)."""
    rline = line.replace("= = =", "===").replace("= =", "==").strip()
    return rline.startswith("= ") and rline.endswith(" =")


def with_blank_lines(lines: list[str]) -> list[str]:
    """Non-blank raw lines with a blank line put back before and after every heading."""
    out: list[str] = []
    for line in lines:
        out += [BLANK, line, BLANK] if is_heading(line) else [line]
    if out and out[-1] != BLANK:
        out.append(BLANK)  # the file's end, like the blank line before a next title
    return out


def pages_from_lines(lines: list[str]) -> list[str]:
    """Articles as the Hub's document-level builder cuts them: a new page at each title."""
    pages, current = [], []
    for line in lines:
        if is_title(line):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    page = "\n".join(current)
    if page.strip():
        pages.append(page)
    return pages


def read_pages(path: Path) -> list[str]:
    """The articles of a blank-line-free WikiText raw file (CRLF or LF line ends)."""
    text = path.read_bytes().decode("utf-8")  # no newline translation: only CRLF/LF end a line
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    return pages_from_lines(with_blank_lines(lines))


def load_wikitext(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """WikiText-2 test articles from the local file (or its pinned download), as the Hub's
    document-level dataset cuts them.

    lm-eval's config names train and validation splits too: they are empty here
    (the data has only the test split; perplexity needs no few-shot examples).
    """
    path = data_file(LOCAL, qeval_data_dir)
    empty = datasets.Dataset.from_dict({"page": []}, features=FEATURES)
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict({"page": read_pages(path)}, features=FEATURES),
            "train": empty,
            "validation": empty,
        }
    )
