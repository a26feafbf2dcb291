"""MT-Bench single-answer grading by an LLM judge behind an OpenAI-compatible endpoint.

Optional and off by default: a judge is used only when an endpoint is
configured, either in the task's params (``params.judge.base_url``, with
``model`` and ``api_key_env``) or in the environment (``QEVAL_JUDGE_BASE_URL``,
``QEVAL_JUDGE_MODEL``, ``QEVAL_JUDGE_API_KEY``).  Without one, nothing here
touches the network, so offline runs stay offline.

Grading follows FastChat's ``llm_judge`` (the code that defines MT-Bench
scores): the ``single-v1`` prompt for turn 1 and ``single-v1-multi-turn`` for
turn 2; for the categories that need a reference (math, reasoning, coding) the
``single-math-v1`` variants with GPT-4's reference answers; temperature 0,
up to 2048 judge tokens; the rating is the number in ``[[rating]]`` (or, as
FastChat's fallback, in ``[rating]``), 1-10.  Only the standard library is used
(``urllib.request``), so the judge adds no dependency.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qeval.eval.registry import TaskParamError

# FastChat's llm_judge/common.py: categories graded against a reference answer
NEED_REF_CATS = ("math", "reasoning", "coding")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered something unusable."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge lives and how to call it."""

    base_url: str  # e.g. http://localhost:8000/v1 ; requests go to {base_url}/chat/completions
    model: str = "gpt-4"  # MT-Bench's judge; local servers often ignore the name
    api_key: str | None = None
    timeout: float = 120.0
    max_tokens: int = 2048
    temperature: float = 0.0
    retries: int = 2

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


def judge_config(
    params: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> JudgeConfig | None:
    """The judge configured by ``params`` (the task's ``judge`` param) or the environment; None if none.

    ``params`` keys: ``base_url``, ``model``, ``api_key_env`` (the name of the
    environment variable holding the key; default ``QEVAL_JUDGE_API_KEY``),
    ``timeout``, ``max_tokens``, ``retries``.  Params win over the environment.
    """
    env = os.environ if environ is None else environ
    p = dict(params or {})
    unknown = set(p) - {"base_url", "model", "api_key_env", "timeout", "max_tokens", "retries"}
    if unknown:
        raise TaskParamError(
            f"unknown judge settings {sorted(unknown)} (allowed: base_url, model, api_key_env, "
            "timeout, max_tokens, retries)"
        )
    base_url = p.get("base_url") or env.get("QEVAL_JUDGE_BASE_URL")
    if not base_url:
        return None
    key_env = p.get("api_key_env") or "QEVAL_JUDGE_API_KEY"
    api_key = env.get(key_env)
    if p.get("api_key_env") and not api_key:
        raise JudgeError(f"judge api_key_env={key_env!r} is set but the environment variable {key_env} is empty")
    return JudgeConfig(
        base_url=str(base_url),
        model=str(p.get("model") or env.get("QEVAL_JUDGE_MODEL") or "gpt-4"),
        api_key=api_key,
        timeout=float(p.get("timeout", 120.0)),
        max_tokens=int(p.get("max_tokens", 2048)),
        retries=int(p.get("retries", 2)),
    )


def chat(cfg: JudgeConfig, system: str, user: str) -> str:
    """One chat completion from the judge; raises :class:`JudgeError` naming the URL on failure."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    body = json.dumps(
        {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "n": 1}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    last: Exception | None = None
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(min(2**attempt, 10))
        req = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
            return str(payload["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            last = JudgeError(f"judge endpoint {cfg.url} answered HTTP {err.code}: {detail}")
            if err.code < 500 and err.code != 429:
                break  # a client error will not go away by retrying
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            last = JudgeError(f"judge endpoint {cfg.url} unreachable (timeout {cfg.timeout:g}s): {err}")
        except (KeyError, IndexError, TypeError, ValueError) as err:
            last = JudgeError(f"judge endpoint {cfg.url} sent no chat completion: {err!r}")
            break
    assert last is not None
    raise last


def parse_rating(text: str) -> float | None:
    """The rating in ``[[x]]`` (else ``[x]``), as FastChat parses it; None when there is none."""
    match = _RATING.search(text) or _RATING_BACKUP.search(text)
    return float(match.group(1)) if match else None


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    """MT-Bench's ``judge_prompts.jsonl`` by prompt name."""
    prompts = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = json.loads(line)
            prompts[p["name"]] = p
    return prompts


def load_reference_answers(path: str | Path) -> dict[int, list[str]]:
    """GPT-4 reference answers (both turns) by question id."""
    refs = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            refs[int(r["question_id"])] = list(r["choices"][0]["turns"])
    return refs


def single_prompt(
    prompts: Mapping[str, Mapping[str, Any]],
    question: Mapping[str, Any],
    answers: list[str],
    turn: int,
    reference: list[str] | None = None,
) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) grading ``answers[turn - 1]`` of one question.

    ``turn`` is 1 or 2; turn 2 shows the whole conversation (FastChat's
    multi-turn prompt).  ``reference`` is used for the categories in
    :data:`NEED_REF_CATS` and required there.
    """
    needs_ref = question.get("category") in NEED_REF_CATS
    if needs_ref and not reference:
        raise JudgeError(
            f"question {question.get('question_id')} ({question.get('category')}) needs a reference "
            "answer for grading; reference_answer_gpt-4.jsonl has none"
        )
    name = ("single-math-v1" if needs_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    q = question["turns"]
    if turn == 1:
        kwargs = dict(question=q[0], answer=answers[0])
        if needs_ref:
            kwargs["ref_answer_1"] = reference[0]  # type: ignore[index]
    else:
        kwargs = dict(question_1=q[0], question_2=q[1], answer_1=answers[0], answer_2=answers[1])
        if needs_ref:
            kwargs.update(ref_answer_1=reference[0], ref_answer_2=reference[1])  # type: ignore[index]
    return name, p["system_prompt"], p["prompt_template"].format(**kwargs)


def grade(
    cfg: JudgeConfig,
    prompts: Mapping[str, Mapping[str, Any]],
    question: Mapping[str, Any],
    answers: list[str],
    turn: int,
    reference: list[str] | None = None,
) -> float | None:
    """The judge's 1-10 rating of one turn's answer (None when it gave no parseable rating)."""
    _, system, user = single_prompt(prompts, question, answers, turn, reference)
    return parse_rating(chat(cfg, system, user))
