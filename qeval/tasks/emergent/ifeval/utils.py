"""IFEval for qeval: local data, lm-eval's own instruction checkers.

The checkers are lm-eval's (``lm_eval.tasks.ifeval``), imported, not copied.
Two of them need NLTK's Punkt sentence model, which lm-eval downloads at
import time.  Offline (no ``punkt_tab`` in any NLTK data folder) qeval falls
back to what NLTK can do without data: an untrained Punkt sentence splitter
for ``count_sentences`` and line-preserving Treebank word tokenisation for
``word_tokenize``.  Scores can then differ from a networked run on prompts
whose instructions count sentences or capital words; ``punkt_available()``
says which case a run was in.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import datasets

from qeval.data import data_file

log = logging.getLogger(__name__)


def punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return True
    except LookupError:
        return False


@functools.lru_cache(maxsize=1)
def _checkers():
    """Import lm-eval's IFEval modules once, installing the offline fallbacks if needed."""
    from lm_eval.tasks.ifeval import instructions_util, utils

    if not punkt_available():
        import nltk

        log.warning(
            "NLTK punkt_tab is not installed: IFEval sentence counting uses an untrained Punkt "
            "splitter (install it with `python -m nltk.downloader punkt_tab` for lm-eval's exact checks)"
        )
        untrained = nltk.tokenize.PunktSentenceTokenizer()
        instructions_util._get_sentence_tokenizer = lambda: untrained
        treebank = nltk.tokenize.word_tokenize
        instructions_util.nltk.word_tokenize = functools.partial(treebank, preserve_line=True)
    return utils


def load_ifeval(qeval_data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """IFEval's prompts: the local file, else its pinned download (qeval.data_sources)."""
    path = data_file("ifeval/input_data.jsonl", qeval_data_dir)
    return datasets.load_dataset("json", data_files={"train": str(path)})


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    return _checkers().process_results(doc, results)


def agg_inst_level_acc(items: list) -> float:
    return _checkers().agg_inst_level_acc(items)
