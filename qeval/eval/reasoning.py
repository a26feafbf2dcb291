"""What a generation task's answers look like: reasoning blocks, length, truncation, loops.

Quantization changes *how* a model answers as well as *whether* it is right: a reasoning model
may think longer, loop until the token budget runs out, or never close its ``<think>`` block
("Quantization Hurts Reasoning?", COLM 2025, reports response length beside accuracy), and a
quantized chat model may start emitting reasoning blocks it did not before.  This module reads
one raw continuation into a :class:`Generation` and summarises many of them; the lm-eval glue
(:mod:`qeval.eval.recording`) applies it to every ``generate_until`` request.

Reading one continuation (:func:`read_generation`):

* **reasoning block.**  Text up to the last ``</think>`` is reasoning, the answer is what
  follows.  A continuation that opens ``<think>`` (or whose prompt ended with it, as R1-style
  chat templates do) and never closes it is *unclosed*: it has no answer at all (the empty
  string, which no extraction filter reads as right), rather than an answer extracted from
  half a thought.  Without either tag the whole text is the answer, exactly as lm-eval reads it.
* **stop sequences** cut the answer at the first one (lm-eval's post-processing, applied after
  the reasoning block as lm-eval does with ``think_end_token``).
* **length** is the number of generated tokens up to the end of the response: the first
  end-of-turn token, the token that completed the first stop sequence, or the whole budget.
* **truncated**: no end-of-turn token and no stop sequence anywhere, i.e. generation ended
  because the budget (``max_gen_toks``) ran out.
* **loops**: the response (reasoning included) repeats itself -- at least
  :data:`LOOP_REPEATED_SHARE` of its words lie in a 4-gram that already occurred in it (the
  repetition half of the dialogue family's degeneration measure, :mod:`qeval.eval.dialogue`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qeval.eval.dialogue import repeated_ngram_ratio

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
LOOP_REPEATED_SHARE = 0.5  # a healthy chain of thought repeats few 4-grams (SmolLM2 GSM8K answers: < 0.2)
THINKING_SETTINGS = ("default", "on", "off")
STATES = ("none", "closed", "unclosed")


@dataclass(frozen=True)
class Generation:
    """One continuation, read: the answer the task's filters see and how it was produced."""

    answer: str  # after a closed reasoning block, cut at the first stop sequence ("" when unclosed)
    state: str  # none (no reasoning block) | closed | unclosed
    tokens: int  # generated tokens up to the end of the response
    reasoning_chars: int  # length of the reasoning block's text (0 without one)
    truncated: bool  # the budget ran out before an end of turn or a stop sequence
    loops: bool  # the response repeats itself (see the module docstring)


def split_reasoning(text: str, prompt_opens: bool = False) -> tuple[str, str, str]:
    """(reasoning, rest, state) of a continuation; ``prompt_opens``: the prompt already ended
    with ``<think>``, so the continuation starts inside the block."""
    if THINK_CLOSE in text:
        reasoning, _, rest = text.rpartition(THINK_CLOSE)
        return reasoning.replace(THINK_OPEN, "", 1).strip(), rest.lstrip(), "closed"
    if prompt_opens or THINK_OPEN in text:
        return text.replace(THINK_OPEN, "", 1).strip(), "", "unclosed"
    return "", text, "none"


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` before the first occurrence of any (non-empty) stop sequence, as lm-eval cuts."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def loops(text: str) -> bool:
    return bool(text.strip()) and repeated_ngram_ratio(text, 4) >= LOOP_REPEATED_SHARE


def read_generation(
    text: str,
    stop: Sequence[str],
    token_ids: Sequence[int] | None,
    eos_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str] | None = None,
    prompt_opens: bool = False,
) -> Generation:
    """Read one raw continuation (``text`` decoded from ``token_ids``, special tokens skipped).

    ``token_ids`` None (a backend that does not expose them): length counts the words of the
    response and truncation is unknown (False)."""
    stop = [s for s in stop if s]
    reasoning, rest, state = split_reasoning(text, prompt_opens)
    answer = cut_at_stop(rest, stop)
    stopped_by_text = any(s in text for s in stop)
    if token_ids is None:
        return Generation(answer, state, len(text.split()), len(reasoning), False, loops(text))
    ids = list(token_ids)
    ends = set(eos_ids)
    eos = next((i for i, t in enumerate(ids) if t in ends), None)
    if eos is not None:
        end = eos + 1
    elif stopped_by_text and decode is not None:
        end = _first_prefix_containing(ids, stop, decode)
    else:
        end = len(ids)
    truncated = eos is None and not stopped_by_text
    body = decode(ids[:end]) if decode is not None else text
    return Generation(answer, state, end, len(reasoning), truncated, loops(cut_at_stop(body, stop)))


def _first_prefix_containing(ids: list[int], stop: Sequence[str], decode: Callable[[Sequence[int]], str]) -> int:
    """The fewest leading tokens whose text holds a stop sequence (binary search: holding one is
    monotone in the prefix length)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return lo


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def generation_metrics(generations: Sequence[Generation]) -> dict[str, float]:
    """A cell's summary of its responses: length distribution (mean, p90, in tokens) and the
    shares truncated at the budget, with an unclosed reasoning block, with any reasoning block,
    and looping (each with the standard error of a proportion)."""
    n = len(generations)
    if n == 0:
        return {}
    tokens = [float(g.tokens) for g in generations]
    mean = sum(tokens) / n
    var = sum((t - mean) ** 2 for t in tokens) / (n - 1) if n > 1 else math.nan
    out = {
        "response_tokens": mean,
        "response_tokens_stderr": math.sqrt(var / n) if n > 1 else math.nan,
        "response_tokens_p90": percentile(tokens, 0.9),
        "responses": float(n),
    }
    for name, flags in (
        ("truncated_share", [g.truncated for g in generations]),
        ("unclosed_think_share", [g.state == "unclosed" for g in generations]),
        ("think_share", [g.state != "none" for g in generations]),
        ("loop_share", [g.loops for g in generations]),
    ):
        p = sum(flags) / n
        out[name] = p
        out[name + "_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
    return out


def generation_columns(generations: Sequence[Generation | None]) -> dict[str, list[int | bool | None]]:
    """Per-item columns of the same measures (None where an item has no recorded generation)."""
    return {
        "response_tokens": [g.tokens if g else None for g in generations],
        "truncated": [g.truncated if g else None for g in generations],
        "unclosed_think": [g.state == "unclosed" if g else None for g in generations],
        "loops": [g.loops if g else None for g in generations],
    }
