"""MT-Bench as a qeval-native dialogue task: two-turn answers, scored for degeneration offline.

Why native: lm-eval has no multi-turn chat generation, and the failure
quantization causes in dialogue (Qllm-Eval: sentence-level repetition at
W3/KV3; token loops and non-words at W2/W4A4/KV2) is visible in the text
itself, so it is measured without a judge (:mod:`qeval.eval.dialogue`).

Protocol.  For each MT-Bench question (the first ``limit`` after the optional
``params.categories`` and ``params.per_category`` filters), turn 1 is answered from the tokenizer's chat
template (``add_generation_prompt=True``); turn 2 sees turn 1 and the model's
*own* turn-1 answer, as in MT-Bench.  Decoding is greedy (MT-Bench samples
some categories at temperature 0.7; greedy makes the quantized-vs-FP
comparison deterministic), ``params.max_new_tokens`` new tokens at most,
batched across questions per turn with left padding.  Models without a chat
template get a plain-text prompt (``User: ...\\nAssistant:``; the answer ends
where the model starts a new ``User:`` line), recorded as ``chat_template: 0``.

Agreement with FP.  ``rougeL_fp`` compares each answer with the unquantized
model's answer to the same turn (each model continuing its own conversation).
The FP answers are generated once with ``ctx.reference`` and cached as JSON
under ``ctx.cache_dir``, keyed by the reference's weight fingerprint, the
generation settings, the prompt format and the question ids, so every later
cell of a sweep reuses them; the FP cell itself (``ctx.is_reference``) stores
its own answers there.

Primary metric ``degeneration`` (lower is better): the share of an answer's
word tokens that are part of a repeated 4-gram or of a non-word
(:func:`qeval.eval.dialogue.degeneration`).  It rises with both Qllm-Eval
failure modes, loops and gibberish, with no threshold.  Repetition alone
(``rep4``) is not enough: a model broken into high-entropy non-words repeats
nothing, so its rep-4 falls *below* the healthy model's (SmolLM2-135M, 24
questions, 128 tokens: rep-4 0.22 at FP, 0.01 at W2g64 RTN, while 29% of its
words are non-words against 0.6% at FP).  Beside it, overall and per turn (``turn1_*``,
``turn2_*``): ``rep4``, sentence repetition, distinct-1/2, non-word share,
empty and unfinished answers (no end of turn within the budget), answer
length in word tokens and ``rougeL_fp``.  An optional LLM judge (MT-Bench
single-answer grading, 1-10) runs only when an endpoint is configured
(:mod:`qeval.eval.judge`).

Items (``ctx.keep_items``, one row per question and turn; :meth:`MTBench.items`): ``id``
``"<question_id>/t<turn>"``, ``question_id``, ``turn``, ``category``, ``degeneration`` (its mean
over the rows is the reported ``degeneration``) and the other per-answer metrics (``rep4``,
``sentence_rep``, ``distinct1``, ``distinct2``, ``nonword``, ``length``, ``empty``,
``rougeL_fp`` when an FP answer exists, None where undefined), ``unfinished``, ``judge_score``
when judged, and ``answer``: the answer's first 80 characters.

Suite entry (data: ``<data dir>/mt_bench/question.jsonl``, plus
``judge_prompts.jsonl`` and ``reference_answer_gpt-4.jsonl`` for the judge)::

    mt_bench:
      task: qeval_mt_bench
      limit: 16          # questions (each has two turns); null: all 80
      batch_size: 8      # questions per generate call
      params: {max_new_tokens: 128, per_category: 2}   # or categories: [writing, roleplay]
      # optional judge: params.judge: {base_url: http://host:8000/v1, model: gpt-4, api_key_env: OPENAI_API_KEY}
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qeval.data import available, data_file, missing_message
from qeval.eval import dialogue
from qeval.eval import judge as judging
from qeval.eval.generation import encode_prompt, generate_greedy, resolve_chat
from qeval.eval.registry import (
    NativeTask,
    TaskContext,
    TaskDataError,
    TaskParamError,
    register_task,
    short_text,
)
from qeval.eval.scores import mean_stderr
from qeval.files import write_bytes_atomically

log = logging.getLogger("qeval.tasks")  # plugins load by path: their __name__ is not under qeval

QUESTIONS = "mt_bench/question.jsonl"
JUDGE_PROMPTS = "mt_bench/judge_prompts.jsonl"
REFERENCE_ANSWERS = "mt_bench/reference_answer_gpt-4.jsonl"
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
CACHE_VERSION = 1
PLAIN_USER, PLAIN_ASSISTANT = "User:", "Assistant:"


# --------------------------------------------------------------------------- prompts and generation


def plain_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The fallback for models without a chat template: ``User: q\\nAssistant: a\\n...Assistant:``."""
    lines = [f"{PLAIN_USER if m['role'] == 'user' else PLAIN_ASSISTANT} {m['content']}" for m in messages]
    return "\n".join(lines) + "\n" + PLAIN_ASSISTANT


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of a conversation ending where the assistant's answer starts: the chat
    template, or MT-Bench's plain ``User:``/``Assistant:`` format (:func:`plain_prompt`)."""
    return encode_prompt(tokenizer, messages, chat, plain_text=None if chat else plain_prompt(messages))


def converse(
    model: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    chat: bool,
) -> tuple[list[list[str]], list[list[bool]]]:
    """Both turns of every question: (answers [q][turn], finished [q][turn])."""
    answers: list[list[str]] = [[] for _ in questions]
    finished: list[list[bool]] = [[] for _ in questions]
    for turn in range(2):
        convs = []
        for q, own in zip(questions, answers):
            messages: list[dict[str, str]] = []
            for t in range(turn):
                messages += [{"role": "user", "content": q["turns"][t]}, {"role": "assistant", "content": own[t]}]
            messages.append({"role": "user", "content": q["turns"][turn]})
            convs.append(prompt_ids(tokenizer, messages, chat))
        t0 = time.perf_counter()
        outs = generate_greedy(model, tokenizer, convs, max_new_tokens, batch_size, seed=seed)
        log.info("mt_bench: turn %d of %d questions in %.1fs", turn + 1, len(questions), time.perf_counter() - t0)
        for k, (ids, done) in enumerate(outs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if not chat:  # the plain prompt's turn ends where the model starts the user's next line
                cut = text.find("\n" + PLAIN_USER)
                if cut >= 0:
                    text, done = text[:cut], True
            answers[k].append(text.strip())
            finished[k].append(bool(done))
    return answers, finished


# --------------------------------------------------------------------------- the task


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@register_task
class MTBench(NativeTask):
    name = "qeval_mt_bench"
    family = "dialogue"
    primary_metric = "degeneration"
    higher_is_better = False
    item_binary = False  # items: degeneration per answer, a share in [0, 1]
    description = (
        "MT-Bench 80 two-turn questions, greedy answers; degeneration (repeated 4-grams + non-words), "
        "rep-4, sentence repetition, distinct-n, ROUGE-L agreement with FP, optional LLM judge"
    )
    data = (QUESTIONS,)

    def __init__(
        self,
        max_new_tokens: int = 128,
        categories: str | Sequence[str] | None = None,
        per_category: int | None = None,
        prompt_format: str = "auto",
        judge: dict[str, Any] | None = None,
    ) -> None:
        """``max_new_tokens`` per answer; ``categories`` (one or a list) filters the questions;
        ``per_category`` keeps the first k questions of each category (MT-Bench's file is ordered by
        category, so a plain ``limit`` samples only the first categories); ``prompt_format`` ``auto``
        (chat template when the tokenizer has one), ``chat`` or ``plain``; ``judge``: the optional LLM
        judge's endpoint (see :func:`qeval.eval.judge.judge_config`)."""
        super().__init__(
            max_new_tokens=max_new_tokens,
            categories=categories,
            per_category=per_category,
            prompt_format=prompt_format,
            judge=judge,
        )
        if per_category is not None and (not isinstance(per_category, int) or per_category <= 0):
            raise TaskParamError(f"invalid value params.per_category={per_category!r}: a positive integer or null")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise TaskParamError(f"invalid value params.max_new_tokens={max_new_tokens!r}: a positive integer")
        cats = [categories] if isinstance(categories, str) else list(categories or [])
        bad = [c for c in cats if c not in CATEGORIES]
        if bad:
            raise TaskParamError(f"invalid value params.categories={bad}: allowed {', '.join(CATEGORIES)}")
        if prompt_format not in ("auto", "chat", "plain"):
            raise TaskParamError(f"invalid value params.prompt_format={prompt_format!r}: allowed auto, chat, plain")
        self.max_new_tokens = max_new_tokens
        self.categories = cats
        self.per_category = per_category
        self.prompt_format = prompt_format
        self.judge_cfg = judging.judge_config(judge)

    # -- data

    def _files(self) -> tuple[str, ...]:
        return self.data + ((JUDGE_PROMPTS, REFERENCE_ANSWERS) if self.judge_cfg else ())

    def data_files(self, include: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The questions and the judge's files (fetched together, so a judge can be added offline)."""
        return (QUESTIONS, JUDGE_PROMPTS, REFERENCE_ANSWERS)

    def check_available(self, data_dir_override: str | None = None, include: tuple[str, ...] = ()) -> None:
        """Local, cached or downloadable (FastChat's files at a pinned commit); downloads nothing."""
        missing = [rel for rel in self._files() if not available(rel, data_dir_override)]
        if missing:
            raise TaskDataError(f"task {self.name!r} cannot run: " + missing_message(missing, data_dir_override))

    def questions(self, limit: int | None = None, data_dir_override: str | None = None) -> list[dict[str, Any]]:
        self.check_available(data_dir_override)
        qs = _read_jsonl(data_file(QUESTIONS, data_dir_override))
        if self.categories:
            qs = [q for q in qs if q["category"] in self.categories]
        if self.per_category:
            taken: dict[str, int] = {}
            kept = []
            for q in qs:
                taken[q["category"]] = taken.get(q["category"], 0) + 1
                if taken[q["category"]] <= self.per_category:
                    kept.append(q)
            qs = kept
        return qs[:limit] if limit else qs

    # -- evaluation

    def _chat(self, tokenizer: Any) -> bool:
        setting = {"auto": "auto", "chat": True, "plain": False}[self.prompt_format]
        chat = resolve_chat(tokenizer, setting, requested="params.prompt_format=chat")
        if not chat and self.prompt_format == "auto":
            log.warning(
                "mt_bench: the tokenizer has no chat template; using the plain 'User: ...\\nAssistant:' "
                "prompt (recorded as chat_template=0)"
            )
        return chat

    def cache_key(
        self, ctx: TaskContext, fingerprint: str, questions: Sequence[dict[str, Any]], batch_size: int, chat: bool
    ) -> dict[str, Any]:
        """Everything that determines the FP answers (the batch size too: padding changes float sums)."""
        template = getattr(ctx.tokenizer, "chat_template", None) if chat else plain_prompt([])
        return {
            "task": self.name,
            "version": CACHE_VERSION,
            "reference_fingerprint": fingerprint,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": batch_size,
            "seed": ctx.seed,
            "prompt": "chat" if chat else "plain",
            "template_sha": hashlib.sha256(str(template).encode()).hexdigest()[:16],
            "question_ids": [q["question_id"] for q in questions],
        }

    def reference_answers(
        self,
        ctx: TaskContext,
        questions: Sequence[dict[str, Any]],
        batch_size: int,
        chat: bool,
        own: list[list[str]] | None = None,
    ) -> list[list[str]] | None:
        """The FP model's answers: from the cache, from ``own`` when the cell is the FP model, or generated."""
        if not ctx.is_reference and ctx.reference is None and not ctx.reference_fingerprint:
            log.warning("mt_bench: no reference (FP) model in the context; rougeL_fp not computed")
            return None
        fingerprint = ctx.reference_fingerprint
        if not fingerprint:
            # qeval.models.loading imports transformers' Auto classes (seconds); only a context
            # built without the runner's fingerprint comes here
            from qeval.models.loading import weights_fingerprint

            fingerprint = weights_fingerprint(ctx.model if ctx.is_reference else ctx.reference)
        key = self.cache_key(ctx, fingerprint, questions, batch_size, chat)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        path = Path(ctx.cache_dir) / f"mt_bench-{digest}.json" if ctx.cache_dir else None
        if path is not None and path.is_file() and not ctx.is_reference:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                log.info("mt_bench: FP answers from %s", path)
                by_id = cached["answers"]
                return [by_id[str(q["question_id"])] for q in questions]
        if ctx.is_reference:
            answers = own
        elif ctx.reference is None:  # prepare_reference did not run for this cell
            log.warning("mt_bench: FP answers not cached and no reference model; rougeL_fp not computed")
            return None
        else:
            log.info("mt_bench: generating the FP model's answers (cached for later cells)")
            answers, _ = converse(
                ctx.reference, ctx.tokenizer, questions, self.max_new_tokens, batch_size, ctx.seed, chat
            )
        assert answers is not None
        if path is not None and not path.is_file():
            blob = json.dumps(
                {"key": key, "answers": {str(q["question_id"]): a for q, a in zip(questions, answers)}},
                indent=1,
                ensure_ascii=False,
            ).encode("utf-8")
            write_bytes_atomically(path, blob)
        return answers

    def prepare_reference(self, ctx: TaskContext) -> None:
        """The FP model's answers, generated with ``ctx.model`` (unquantized) and cached."""
        questions = self.questions(ctx.limit, ctx.data_dir)
        if questions:
            self.reference_answers(ctx, questions, int(ctx.extra.get("batch_size") or 16), self._chat(ctx.tokenizer))

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        questions = self.questions(ctx.limit, ctx.data_dir)
        if not questions:
            raise TaskParamError(
                f"no MT-Bench question left after params.categories={self.categories}, per_category={self.per_category}"
            )
        batch_size = int(ctx.extra.get("batch_size") or 16)
        chat = self._chat(ctx.tokenizer)
        answers, finished = converse(
            ctx.model, ctx.tokenizer, questions, self.max_new_tokens, batch_size, ctx.seed, chat
        )
        refs = self.reference_answers(ctx, questions, batch_size, chat, own=answers)
        per_turn: list[list[dict[str, float]]] = [[], []]
        for k in range(len(questions)):
            for t in range(2):
                row = dialogue.answer_metrics(answers[k][t], refs[k][t] if refs is not None else None)
                row["unfinished"] = float(not finished[k][t])
                per_turn[t].append(row)
        metrics: dict[str, Any] = dialogue.aggregate(per_turn[0] + per_turn[1])
        metrics.update(dialogue.aggregate(per_turn[0], "turn1_"))
        metrics.update(dialogue.aggregate(per_turn[1], "turn2_"))
        ratings = None
        if self.judge_cfg is not None:
            judged, ratings = self._judge(ctx, questions, answers)
            metrics.update(judged)
        ctx.keep_items(**self.items(questions, answers, per_turn, ratings))
        metrics["chat_template"] = float(chat)
        metrics["samples"] = len(per_turn[0]) + len(per_turn[1])
        self.last_answers = answers  # for scripts that want to look at the text
        return metrics

    @staticmethod
    def items(
        questions: Sequence[dict[str, Any]],
        answers: list[list[str]],
        per_turn: list[list[dict[str, float]]],
        ratings: list[list[float | None]] | None = None,
    ) -> dict[str, list[Any]]:
        """One row per question and turn (``id`` ``"<question_id>/t<turn>"``): the question's id,
        turn and category, every per-answer metric of :func:`qeval.eval.dialogue.answer_metrics`
        (``degeneration`` first; NaN, an undefined value, is kept as None), ``unfinished``,
        ``judge_score`` when judged (None where the judge gave no rating) and the answer's first
        characters (``answer``)."""
        cols: dict[str, list[Any]] = {"id": [], "question_id": [], "turn": [], "category": []}
        metric_names: list[str] = []
        for rows in per_turn:
            for row in rows:
                metric_names += [m for m in row if m not in metric_names]
        cols.update({m: [] for m in metric_names})
        if ratings is not None:
            cols["judge_score"] = []
        cols["answer"] = []
        for k, q in enumerate(questions):
            for t in range(2):
                cols["id"].append(f"{q['question_id']}/t{t + 1}")
                cols["question_id"].append(q["question_id"])
                cols["turn"].append(t + 1)
                cols["category"].append(q.get("category"))
                for m in metric_names:
                    cols[m].append(per_turn[t][k].get(m))
                if ratings is not None:
                    cols["judge_score"].append(ratings[k][t])
                cols["answer"].append(short_text(answers[k][t]))
        return cols

    def _judge(
        self, ctx: TaskContext, questions: Sequence[dict[str, Any]], answers: list[list[str]]
    ) -> tuple[dict[str, float], list[list[float | None]]]:
        """The judge's metrics and its rating of every answer ([question][turn], None: unparsed)."""
        cfg = self.judge_cfg
        assert cfg is not None
        prompts = judging.load_judge_prompts(data_file(JUDGE_PROMPTS, ctx.data_dir))
        refs = judging.load_reference_answers(data_file(REFERENCE_ANSWERS, ctx.data_dir))
        scores: list[list[float]] = [[], []]
        ratings: list[list[float | None]] = []
        unparsed = 0
        t0 = time.perf_counter()
        for q, a in zip(questions, answers):
            ratings.append([])
            for turn in (1, 2):
                rating = judging.grade(cfg, prompts, q, a, turn, refs.get(int(q["question_id"])))
                ratings[-1].append(rating)
                if rating is None:
                    unparsed += 1
                else:
                    scores[turn - 1].append(rating)
        log.info(
            "mt_bench: judged %d answers with %s at %s in %.1fs",
            2 * len(questions),
            cfg.model,
            cfg.base_url,
            time.perf_counter() - t0,
        )
        out: dict[str, float] = {}
        for prefix, values in (("", scores[0] + scores[1]), ("turn1_", scores[0]), ("turn2_", scores[1])):
            mean, err, _ = mean_stderr(values)
            out[f"{prefix}judge_score"], out[f"{prefix}judge_score_stderr"] = mean, err
        out["judge_unparsed"] = float(unparsed)
        return out, ratings
