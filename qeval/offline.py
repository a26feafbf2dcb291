"""Whether downloads are off: one reading of the switches, for data files, models and tasks.

``HF_HUB_OFFLINE`` is the Hub's own switch and ``QEVAL_OFFLINE`` qeval's; either, set to a
true value the way huggingface_hub reads one (``1``, ``true``, ``yes``, ``on``, any case),
turns a missing local file into an error named before any model loads, instead of a
download.  A leaf (standard library only) so that every checker asks the same question.
"""

from __future__ import annotations

import os

SWITCHES = ("HF_HUB_OFFLINE", "QEVAL_OFFLINE")
_TRUE = frozenset({"1", "true", "yes", "on"})


def offline() -> bool:
    """Whether the user switched downloads off."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in SWITCHES)
