"""Greedy generation for qeval-native tasks: prompts, end of turn, context limit.

Every native task that makes the model write (MT-Bench dialogue, LongEval, needle in a
haystack) builds its prompt and decodes here, so a fix to chat templates, EOS handling or
context capping reaches all of them, and quantized and unquantized cells of a sweep see the
same prompt tokens.

* Prompts (:func:`encode_prompt`): with the tokenizer's chat template, the conversation
  rendered with ``add_generation_prompt=True`` and tokenized without adding special tokens
  (the template already holds the ones it wants, as ``apply_chat_template(tokenize=True)``
  does), optionally followed by the start of the answer; without one, a plain-text prompt
  with the tokenizer's usual special tokens (BOS).
* Decoding (:func:`generate_greedy`): greedy (no sampling, one beam), batched with left
  padding, longest prompts first so a batch holds prompts of similar length.  A prompt longer
  than the context window minus ``max_new_tokens`` keeps its last tokens (logged).  The
  result is the new tokens before the first end-of-turn token and whether the model ended
  its turn at all within the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from qeval.eval.registry import TaskParamError

log = logging.getLogger(__name__)

Message = Mapping[str, str]  # {"role": "user" | "assistant" | "system", "content": ...}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat(tokenizer: Any, setting: Any, requested: str = "chat_template=true") -> bool:
    """Whether to use the chat template: ``auto``/None when the tokenizer has one, true (also
    "true", "1", "yes") to require it, anything else for the plain prompt.

    Requiring a template the tokenizer lacks is a :class:`TaskParamError` whose message starts
    with ``requested`` (the task's own name for the setting)."""
    if setting in (None, "auto"):
        return has_chat_template(tokenizer)
    if setting is True or str(setting).lower() in ("true", "1", "yes"):
        if not has_chat_template(tokenizer):
            raise TaskParamError(f"{requested} but the tokenizer has no chat template")
        return True
    return False


def encode_prompt(
    tokenizer: Any,
    messages: str | Sequence[Message],
    use_chat: bool,
    answer_prefix: str = "",
    plain_text: str | None = None,
) -> list[int]:
    """Token ids of a prompt ending where the model's answer starts.

    ``messages`` is a conversation, or one string for a single user turn.  With ``use_chat``
    it goes through the chat template, then ``answer_prefix`` (the first words of the
    assistant's answer, which turns a chatty small model's reply into the retrieval a task
    tests).  Without, the prompt is ``plain_text`` when given (a task's own plain format for a
    conversation), else the single user turn followed by ``answer_prefix`` on a new line.
    """
    turns = [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    if use_chat:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text + answer_prefix, add_special_tokens=False).input_ids)
    if plain_text is None:
        if len(turns) != 1:
            raise ValueError("a plain prompt of several turns needs plain_text (the task's own format)")
        plain_text = turns[0]["content"] + ("\n" + answer_prefix if answer_prefix else "")
    return list(tokenizer(plain_text).input_ids)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a turn: the model's generation config's (chat models often list their
    end-of-turn token there), then the tokenizer's EOS, without repeats."""
    ids: list[int] = []
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def context_limit(model: Any, max_new_tokens: int, max_tokens: int | None = None) -> int:
    """The longest prompt (in tokens) that leaves room for the answer: the model's context
    window (``config.max_position_embeddings``; unlimited when it has none) or the smaller
    ``max_tokens`` budget, minus ``max_new_tokens``."""
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9
    limit = min(int(window), int(max_tokens)) if max_tokens else int(window)
    return limit - int(max_new_tokens)


class Generation(NamedTuple):
    """One prompt's continuation."""

    ids: list[int]  # the new tokens before the first end-of-turn token
    finished: bool  # whether the model ended its turn within max_new_tokens


@torch.inference_mode()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 1,
    eos_ids: Sequence[int] | None = None,
    seed: int | None = None,
) -> list[Generation]:
    """Greedy continuations of token-id prompts, in the order of ``prompts``.

    ``eos_ids`` end a turn (default :func:`eos_token_ids`).  ``batch_size=1`` pads nothing,
    so every cell sees exactly its prompt's tokens (padding interacts with per-token
    activation and KV quantization); larger batches trade that for speed.  ``seed`` seeds
    torch's global generator first (greedy decoding draws nothing; tasks that always did so
    keep doing it so that what runs after them sees the same random state).
    """
    # transformers takes over a second to import; task discovery (qeval-tasks, every preflight)
    # imports the task plugins, hence this module, and never generates
    from transformers import GenerationConfig

    if seed is not None:
        torch.manual_seed(seed)
    eos = list(eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos or None, pad_token_id=pad
    )
    keep = max(1, context_limit(model, max_new_tokens))
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generation] = [Generation([], False)] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [list(prompts[i]) for i in idx]
        if any(len(r) > keep for r in rows):
            log.warning(
                "prompt longer than %d tokens (context window minus max_new_tokens), keeping its last %d", keep, keep
            )
            rows = [r[-keep:] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r) :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        for j, i in enumerate(idx):
            new = gen[j, width:].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), None)
            out[i] = Generation(new if stop is None else new[:stop], stop is not None)
    return out
