"""lm-eval's HF model, recording how each generation ended (reasoning block, length, truncation).

lm-eval's ``HFLM.generate_until`` decodes each continuation and hands it to
``postprocess_generated_text`` (stop sequences cut, optional think-token strip), keeping only
the cut text.  What a reasoning-model evaluation needs -- how many tokens the answer took,
whether the budget ran out, whether the reasoning block was closed -- is gone by then.  The
mixin here keeps lm-eval's generation loop as it is and replaces only that post-processing
step, for the duration of the call, with :func:`qeval.eval.reasoning.read_generation`, which
returns the same cut text (identical when the model writes no reasoning block) and also
reads the raw tokens lm-eval just decoded.  Each request's :class:`Generation` is kept under
``(task name, doc id)`` in :attr:`RecordsGenerations.generations`.

Why patch a module function rather than subclass more: ``generate_until`` is lm-eval's
batching, stop criteria and left truncation in one method; re-implementing it would drift
from lm-eval, which is what qeval's scores must equal.
"""

from __future__ import annotations

from typing import Any

from qeval.eval.generation import eos_token_ids
from qeval.eval.reasoning import THINK_OPEN, Generation, read_generation


class RecordedText(str):
    """The cut answer lm-eval keeps, carrying how it was produced (``.generation``)."""

    generation: Generation

    def __new__(cls, text: str, generation: Generation) -> RecordedText:
        obj = super().__new__(cls, text)
        obj.generation = generation
        return obj


class RecordsGenerations:
    """Mixin over lm-eval's ``HFLM`` (or a subclass): see the module docstring."""

    generations: dict[tuple[str, int], Generation]
    _last_tokens: list[int] | None

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, list):  # generate_until decodes each continuation's ids right before post-processing
            self._last_tokens = tokens
        return super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)  # type: ignore[misc]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        import lm_eval.models.huggingface as hf

        if not hasattr(self, "generations"):
            self.generations = {}
        tokenizer = self.tokenizer  # type: ignore[attr-defined]
        eos = set(eos_token_ids(self.model, tokenizer))  # type: ignore[attr-defined]
        eos.add(int(self.eot_token_id))  # type: ignore[attr-defined]
        opens = any(str(r.args[0]).rstrip().endswith(THINK_OPEN) for r in requests)

        def decode(ids: Any) -> str:
            return tokenizer.decode(list(ids), skip_special_tokens=True)

        def post(generation: str, stop: Any, think_end_token: Any = None) -> str:
            stops = [stop] if isinstance(stop, str) else list(stop or [])
            read = read_generation(generation, stops, self._last_tokens, sorted(eos), decode, opens)
            self._last_tokens = None
            return RecordedText(read.answer, read)

        original = hf.postprocess_generated_text
        self._last_tokens = None
        hf.postprocess_generated_text = post
        try:
            out = super().generate_until(requests, disable_tqdm=disable_tqdm)  # type: ignore[misc]
        finally:
            hf.postprocess_generated_text = original
        for request, text in zip(requests, out):
            generation = getattr(text, "generation", None)
            if generation is not None:
                self.generations.setdefault((str(request.task_name), int(request.doc_id)), generation)
        return [str(t) for t in out]
