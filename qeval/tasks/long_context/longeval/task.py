"""LongEval (LongChat) line and topic retrieval as qeval-native tasks.

Why native: lm-eval has no LongEval task, and the point here is a *length sweep*
(accuracy per number of lines/topics, capped by the model's context window), which
an lm-eval YAML task can't express.  Qllm-Eval found long-context retrieval more
sensitive to KV-cache quantization than short tasks; these tasks measure that.

Suite entry (every key of ``params`` optional)::

    longeval_lines:
      task: qeval_longeval_lines
      limit: 10                 # cases per length (default: 50, LongEval's count)
      params:
        num_lines: [5, 10, 20]  # 200/300/400/500 read LongChat's shipped cases, others are generated
        max_new_tokens: 8
        max_tokens: null        # prompt+answer budget in tokens (besides the context window)
        chat_template: auto     # auto | true | false
        answer_prefix: true     # start the answer with the queried line's own prefix
        extract: first          # first | last number of the answer (LongChat: last)
        local: true             # use LongChat's shipped cases where a file exists

Small models are weak at LongEval: SmolLM2-135M-Instruct (8k context) recalls the right
line in about half the cases at 5 lines and a quarter at 20 (chance: 1/n), and names the
first topic only when there is one; with the chat template and no ``answer_prefix`` it
almost never answers with a number.  Hence the short default lengths; LongChat's own
sizes (200-500 lines, 5+ topics) are for larger models.

Metrics: ``acc@<n>lines`` (+ ``_stderr``), ``context_tokens@<n>lines`` (mean prompt
length), ``skipped@<n>lines`` (longest prompt of a length that does not fit), ``acc`` =
accuracy at the longest tested length ``acc_at``, ``max_prompt_tokens``, ``samples``.

Items (``ctx.keep_items``, one row per scored case; :func:`longeval_gen.case_items`): ``id``
``"<n>lines/<case>"`` (or ``topics``), ``acc`` (0/1 at ``acc_at``, None at shorter lengths: its
mean is the reported ``acc``), ``correct`` (0/1, every case), ``size``, ``answer`` (lines: the
extracted number; topics: the short generation), ``expected``, ``prompt_tokens``.
"""

from __future__ import annotations

import logging
from typing import Any

from qeval.data_sources import SOURCES, files_under
from qeval.eval.generation import context_limit, encode_prompt, resolve_chat
from qeval.eval.registry import NativeTask, TaskContext, TaskParamError, register_task
from qeval.tasks.long_context import longeval_gen as lg

log = logging.getLogger("qeval.tasks")  # plugins load by path: their __name__ is not under qeval

DEFAULT_CASES = 50  # LongEval's test files have 50 cases per length


class _LongEvalBase(NativeTask):
    """Shared loop: build cases per size, encode, skip what does not fit, generate, score."""

    family = "long_context"
    primary_metric = "acc"
    higher_is_better = True
    item_binary = True  # items: acc/correct are 0/1 per case
    unit: str = ""

    def __init__(
        self,
        max_new_tokens: int,
        max_tokens: int | None,
        chat_template: Any,
        answer_prefix: bool,
        local: bool,
        **params: Any,
    ) -> None:
        if int(max_new_tokens) < 1:
            raise TaskParamError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_tokens is not None and int(max_tokens) < 1:
            raise TaskParamError(f"max_tokens must be >= 1 or null, got {max_tokens}")
        if chat_template not in (None, "auto", True, False, "true", "false"):
            raise TaskParamError(f"chat_template must be auto, true or false, got {chat_template!r}")
        super().__init__(
            max_new_tokens=int(max_new_tokens),
            max_tokens=max_tokens,
            chat_template=chat_template,
            answer_prefix=bool(answer_prefix),
            local=bool(local),
            **params,
        )

    # subclass hooks
    def sizes(self) -> list[int]:
        raise NotImplementedError

    def cases(self, size: int, count: int, ctx: TaskContext) -> list[lg.Case]:
        raise NotImplementedError

    def prefix(self, case: lg.Case) -> str:
        raise NotImplementedError

    def score(self, output: str, case: lg.Case) -> bool:
        raise NotImplementedError

    def answer(self, output: str) -> str | None:
        """What the ``answer`` item column shows of an output: the generation itself (it is a few tokens)."""
        return output

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        p = self.params
        count = ctx.limit if ctx.limit is not None else DEFAULT_CASES
        use_chat = resolve_chat(ctx.tokenizer, p["chat_template"])
        limit_tokens = context_limit(ctx.model, p["max_new_tokens"], p["max_tokens"])
        settings = {}
        for n in self.sizes():
            settings[n] = [
                (c, encode_prompt(ctx.tokenizer, c.prompt, use_chat, self.prefix(c) if p["answer_prefix"] else ""))
                for c in self.cases(n, count, ctx)
            ]
        results, skipped = lg.run_settings(
            ctx.model, ctx.tokenizer, settings, self.score, p["max_new_tokens"], limit_tokens, log
        )
        if skipped:
            log.warning("%s: %s", self.name, lg.skip_note(skipped, self.unit, limit_tokens))
        ctx.keep_items(**lg.case_items(settings, results, lambda n, i: f"{n}{self.unit}/{i}", self.answer))
        return lg.summarize(results, skipped, self.unit, limit_tokens)


@register_task
class LongEvalLines(_LongEvalBase):
    """LongEval line retrieval: recall the number registered on one of ``n`` lines."""

    name = "qeval_longeval_lines"
    description = (
        "LongEval line retrieval (LongChat): the REGISTER_CONTENT of one of n lines; accuracy per "
        "number of lines, primary acc at the longest that fits"
    )
    data = ("longeval/lines/200_lines.jsonl",)  # shipped cases, also the source of generated line names
    unit = "lines"

    def __init__(
        self,
        num_lines: Any = (5, 10, 20),
        max_new_tokens: int = 8,
        max_tokens: int | None = None,
        chat_template: Any = "auto",
        answer_prefix: bool = True,
        extract: str = "first",
        local: bool = True,
    ) -> None:
        if extract not in ("first", "last"):
            raise TaskParamError(f"extract must be 'first' or 'last', got {extract!r}")
        super().__init__(
            max_new_tokens,
            max_tokens,
            chat_template,
            answer_prefix,
            local,
            num_lines=lg.int_list(num_lines, "num_lines"),
            extract=extract,
        )

    def data_files(self, include: tuple[str, ...] = ()) -> tuple[str, ...]:
        # all shipped files: the generated cases take their line names from every one of them
        return tuple(files_under(lg.LINES_DIR + "/"))

    def sizes(self) -> list[int]:
        return self.params["num_lines"]

    def cases(self, size: int, count: int, ctx: TaskContext) -> list[lg.Case]:
        return lg.lines_cases(size, count, ctx.seed, ctx.data_dir, prefer_local=self.params["local"])

    def prefix(self, case: lg.Case) -> str:
        return lg.LINES_ANSWER.format(index=case.target)

    def score(self, output: str, case: lg.Case) -> bool:
        return lg.number_correct(output, case.answer, self.params["extract"])

    def answer(self, output: str) -> str | None:
        """The number the score reads (None when the output has none)."""
        return lg.extract_number(output, self.params["extract"])


@register_task
class LongEvalTopics(_LongEvalBase):
    """LongEval topic retrieval: name the first of ``n`` conversation topics."""

    name = "qeval_longeval_topics"
    description = (
        "LongEval topic retrieval (LongChat): the first topic of n conversations; accuracy per number "
        "of topics (topic text contained in the answer), primary acc at the longest that fits"
    )
    data = ("longeval/topics/conversations.jsonl",)
    unit = "topics"

    def __init__(
        self,
        num_topics: Any = (1, 2, 3),
        max_new_tokens: int = 24,
        max_tokens: int | None = None,
        chat_template: Any = "auto",
        answer_prefix: bool = True,
        local: bool = True,
    ) -> None:
        sizes = lg.int_list(num_topics, "num_topics")
        if sizes[-1] > 30:
            raise TaskParamError(f"num_topics must be at most 30 (LongChat has 30 conversations), got {num_topics!r}")
        super().__init__(max_new_tokens, max_tokens, chat_template, answer_prefix, local, num_topics=sizes)

    def data_files(self, include: tuple[str, ...] = ()) -> tuple[str, ...]:
        shipped = [f"{lg.TOPICS_DIR}/{n}_topics.jsonl" for n in self.sizes()] if self.params["local"] else []
        return tuple(self.data) + tuple(rel for rel in shipped if rel in SOURCES)

    def sizes(self) -> list[int]:
        return self.params["num_topics"]

    def cases(self, size: int, count: int, ctx: TaskContext) -> list[lg.Case]:
        return lg.topics_cases(size, count, ctx.seed, ctx.data_dir, prefer_local=self.params["local"])

    def prefix(self, case: lg.Case) -> str:
        return lg.TOPICS_ANSWER

    def score(self, output: str, case: lg.Case) -> bool:
        return lg.topic_correct(output, case.answer)
