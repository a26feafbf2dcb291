"""Log-likelihood requests scored with each shared context computed once.

A multiple-choice task sends lm-eval one request per (context, choice) pair, and lm-eval's
``HFLM`` runs the whole context again for every choice (its one-token logits cache helps
only when every choice is one token).  :class:`SharedContextLM` is an ``HFLM`` whose
``_loglikelihood_tokens`` groups the requests by their context tokens and runs each context
once:

1. **Context pass.** The contexts of up to ``batch_size`` groups go through the model in one
   right-padded batch with no attention mask, exactly as ``HFLM`` feeds a batch.  The logits
   of each context's last position give every continuation's first token; the language-model
   head runs on those positions only.  The KV cache is kept when some continuation is longer.
2. **Continuation pass** (continuations of two tokens or more).  Each such continuation is
   one row, fed all its tokens but the last.  Every row gets a *copy* of its group's cached
   keys and values, right-aligned in a fresh ``DynamicCache`` (the left padding masked by a
   2D attention mask), with position ids that go on from the context's length; the rows'
   logits predict the continuation's remaining tokens.  Rows go longest first, as many per
   forward as keep their tokens (cached slots included) within one ``HFLM`` batch of the
   unit's longest sequence, so the copies never need more memory than ``HFLM`` would.

Every token thus sees the same keys and values at the same positions as in ``HFLM``'s single
forward; results differ only by floating-point summation order (well under 1e-4 in
log-likelihood for answers of a few tokens).  Step 2's cache is a new object filled from
step 1's tensors, so no cache is mutated across rows.  qeval's KV quantizers wrap a cache's
``update`` (``qeval.quant.kv``): step 1 stores the context's states already quantized and
step 2 quantizes only the new tokens.  That equals the single forward only when quantizing a
token never depends on the other tokens of the sequence:
:func:`qeval.eval.scorer.shared_context_allowed` decides it from the spec, and the scorer
otherwise uses plain ``HFLM``.

Kept as ``HFLM`` does it: left truncation (``(context + continuation)[-(max_length + 1):]``;
the effective context of a truncated request depends on its continuation, and requests are
grouped by effective context), results in input order, ``cache_hook`` partial results,
``softmax_dtype`` and ``mixed_precision_dtype``, and the greedy-match flag.  What this path
does not reproduce goes to ``HFLM``'s own ``_loglikelihood_tokens``: seq2seq models,
automatic batch sizes, rolling windows (``loglikelihood_rolling``, whose windows share no
context), a group whose context and continuation do not fit a sliding-window layer, and
models whose cache has layers other than full or sliding attention.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (request strings, context, continuation)
Answer = tuple[float, bool]  # (log-likelihood, whether greedy decoding produces the continuation)
LayerStates = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, tokens, dim]


@dataclass
class _Group:
    """The requests whose effective context is ``context``: distinct continuation -> request indices."""

    context: tuple[int, ...]
    continuations: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    @property
    def fed(self) -> int:
        """Tokens the longest continuation feeds in the continuation pass (0: none needed)."""
        return max(len(c) for c in self.continuations) - 1


@dataclass
class _Row:
    """One continuation of two tokens or more in the continuation pass."""

    group: int  # the group's row in the context pass
    past: int  # its context's length
    continuation: tuple[int, ...]
    owners: list[int]  # the requests it answers


def _cache_limits(config: Any) -> tuple[bool, int | None]:
    """(whether every cache layer is one this path handles, the smallest sliding window)."""
    layers = DynamicCache(config=config).layers
    if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return False, None
    windows = [layer.sliding_window for layer in layers if isinstance(layer, DynamicSlidingWindowLayer)]
    return True, min(windows) if windows else None


class SharedContextLM(HFLM):
    """lm-eval's ``HFLM`` with the context of grouped requests computed once (see the module).

    ``rows_per_batch``: continuation rows per forward (default: by the token budget of
    :meth:`_chunks`).
    """

    def __init__(self, *args: Any, rows_per_batch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows_per_batch = rows_per_batch
        self._cache_ok, self._window = _cache_limits(self.model.config)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        #: requests scored here, their groups (contexts computed), requests left to HFLM's path
        self.shared_stats = {"requests": 0, "groups": 0, "fallback": 0}

    # ------------------------------------------------------------------ entry point

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[Answer]:
        if (
            override_bs is not None  # loglikelihood_rolling's windows: nothing is shared
            or self.backend != "causal"
            or not isinstance(self.batch_size, int)
            or not self._cache_ok
        ):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups, fallback = self._group(requests)
        self.shared_stats["requests"] += len(requests) - len(fallback)
        self.shared_stats["groups"] += len(groups)
        self.shared_stats["fallback"] += len(fallback)
        results: list[Answer | None] = [None] * len(requests)
        if fallback:  # HFLM's own path (it reports its partial results itself)
            for i, answer in zip(fallback, super()._loglikelihood_tokens([requests[i] for i in fallback], True)):
                results[i] = answer
        pbar = tqdm(
            total=len(requests) - len(fallback),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (shared contexts)",
        )
        for unit in self._units(groups):
            for indices, answer in self._score_unit(unit):
                for i in indices:
                    results[i] = answer
                    request_str = requests[i][0]
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(len(indices))
        pbar.close()
        answers = [r for r in results if r is not None]
        assert len(answers) == len(requests)
        return answers

    # ------------------------------------------------------------------ planning

    def _fits_window(self, past: int, fed: int) -> bool:
        """Whether contexts of ``past`` tokens, continued by ``fed`` tokens, stay within every
        sliding window (their cached states are then all kept); trivially so without a second pass."""
        return self._window is None or fed == 0 or past + fed <= self._window

    def _group(self, requests: list[Request]) -> tuple[list[_Group], list[int]]:
        """Requests grouped by their effective (left-truncated) context; the indices left to HFLM."""
        by_context: dict[tuple[int, ...], _Group] = {}
        for i, (_, context, continuation) in enumerate(requests):
            assert len(context) > 0
            assert len(continuation) > 0
            assert len(continuation) <= self.max_length
            # HFLM's input: the last max_length + 1 tokens, the last one never fed
            window = (context + continuation)[-(self.max_length + 1) :]
            ctx = tuple(window[: len(window) - len(continuation)])
            group = by_context.setdefault(ctx, _Group(ctx))
            group.continuations.setdefault(tuple(continuation), []).append(i)
        groups: list[_Group] = []
        fallback: list[int] = []
        for group in by_context.values():
            if self._fits_window(len(group.context), group.fed):
                groups.append(group)
            else:  # a sliding-window layer would drop context states the second pass reads
                fallback.extend(i for indices in group.continuations.values() for i in indices)
        # longest contexts first, as HFLM orders its batches (little padding; memory peaks at once)
        groups.sort(key=lambda g: (-len(g.context), -g.fed, g.context))
        return groups, sorted(fallback)

    def _units(self, groups: list[_Group]) -> Iterator[list[_Group]]:
        """Consecutive groups that make one context pass: at most ``batch_size`` contexts, as
        ``HFLM`` batches sequences; with sliding windows, their states fit the window."""
        unit: list[_Group] = []
        past = fed = 0
        for group in groups:
            grown = max(past, len(group.context)), max(fed, group.fed)
            if unit and (len(unit) >= self.batch_size or not self._fits_window(*grown)):
                yield unit
                unit, grown = [], (len(group.context), group.fed)
            unit.append(group)
            past, fed = grown
        if unit:
            yield unit

    # ------------------------------------------------------------------ scoring

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )

    def _score_unit(self, unit: list[_Group]) -> Iterator[tuple[list[int], Answer]]:
        """(request indices, answer) for every distinct continuation of the unit's groups."""
        first, states = self._context_pass(unit)  # [groups, vocab] log-probs of the first token
        top = first.argmax(dim=-1).tolist()
        rows: list[_Row] = []
        for g, group in enumerate(unit):
            for continuation, indices in group.continuations.items():
                if len(continuation) == 1:
                    yield indices, (float(first[g, continuation[0]]), top[g] == continuation[0])
                else:
                    rows.append(_Row(g, len(group.context), continuation, indices))
        if not rows:
            return
        assert states is not None
        # longest continuations first, so that each forward pads its rows little
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].continuation))
        for chunk in self._chunks([rows[r] for r in order], max(len(g.context) + g.fed for g in unit)):
            answers = self._continuation_pass(states, chunk)
            for row, (lp_rest, greedy_rest) in zip(chunk, answers):
                # HFLM sums all the continuation's log-probs at once; the same terms, in two parts
                head = row.continuation[0]
                lp = float(first[row.group, head]) + lp_rest
                yield row.owners, (lp, top[row.group] == head and greedy_rest)

    def _chunks(self, rows: list[_Row], longest: int) -> Iterator[list[_Row]]:
        """Rows (longest first) cut into forwards: ``rows_per_batch`` rows each, or by default as
        many as keep rows x (context slots + fed tokens) within ``batch_size`` x ``longest``, the
        tokens of one HFLM batch of the unit's longest sequence (at least one row)."""
        if self.rows_per_batch:
            for start in range(0, len(rows), self.rows_per_batch):
                yield rows[start : start + self.rows_per_batch]
            return
        budget = int(self.batch_size) * longest
        chunk: list[_Row] = []
        for row in rows:  # chunk[0] is the longest of its chunk: its width is the chunk's
            past = max(r.past for r in (*chunk, row))
            if chunk and (len(chunk) + 1) * (past + len(chunk[0].continuation) - 1) > budget:
                yield chunk
                chunk = []
            chunk.append(row)
        if chunk:
            yield chunk

    @torch.no_grad()
    def _context_pass(self, unit: list[_Group]) -> tuple[torch.Tensor, LayerStates | None]:
        """Log-probs after each context (``[groups, vocab]``) and, when some continuation needs
        them, each layer's cached states (right-padded, ``[groups, heads, longest, dim]``)."""
        longest = max(len(g.context) for g in unit)
        inputs = torch.zeros(len(unit), longest, dtype=torch.long)
        for b, group in enumerate(unit):
            inputs[b, : len(group.context)] = torch.tensor(group.context, dtype=torch.long)
        last = torch.tensor([len(g.context) - 1 for g in unit])
        keep_cache = any(g.fed > 0 for g in unit)
        kwargs: dict[str, Any] = {"use_cache": keep_cache}
        if self._keeps_logits:  # the head on the distinct last positions only
            positions, column = torch.unique(last, return_inverse=True)
            kwargs["logits_to_keep"] = positions.to(self.device)
        else:
            column = last
        with self._autocast():
            out = self.model(inputs.to(self.device), **kwargs)
        logits = out.logits[torch.arange(len(unit), device=out.logits.device), column.to(out.logits.device)]
        first = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        if not keep_cache:
            return first, None
        states = []
        for layer in out.past_key_values.layers:
            keys, values = layer.keys, layer.values
            if keys is None or values is None or keys.shape[-2] != longest:
                raise RuntimeError(f"cache layer {type(layer).__name__} did not keep the {longest} context tokens")
            states.append((keys, values))
        return first, states

    def _row_cache(self, states: LayerStates, rows: list[_Row], past: int) -> DynamicCache:
        """A fresh cache holding, for each row, a copy of its group's context states
        right-aligned in ``past`` slots (so that every row's continuation starts at slot ``past``)."""
        slots = torch.arange(past).unsqueeze(0)
        group_idx = torch.tensor([r.group for r in rows]).unsqueeze(1).expand(-1, past)
        token_idx = (slots - torch.tensor([past - r.past for r in rows]).unsqueeze(1)).clamp(min=0)
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        cache = DynamicCache(config=self.model.config)
        for layer_idx, (keys, values) in enumerate(states):
            if keys.device not in on_device:  # layers may sit on several devices (device_map)
                on_device[keys.device] = (group_idx.to(keys.device), token_idx.to(keys.device))
            gi, ti = on_device[keys.device]
            # [groups, heads, tokens, dim] -> [rows, heads, past, dim]: a copy (advanced indexing);
            # masked slots hold the group's first token
            k = keys.transpose(1, 2)[gi, ti].transpose(1, 2).contiguous()
            v = values.transpose(1, 2)[gi, ti].transpose(1, 2).contiguous()
            # filled before the forward: a KV quantizer wraps `update` only when the model
            # receives the cache, so these (already quantized) states are stored as they are
            cache.update(k, v, layer_idx)
        return cache

    @torch.no_grad()
    def _continuation_pass(self, states: LayerStates, rows: list[_Row]) -> list[Answer]:
        """(sum of log-probs, all greedy) of each row's continuation after its first token."""
        past = max(r.past for r in rows)
        width = max(len(r.continuation) - 1 for r in rows)
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.ones(len(rows), past + width, dtype=torch.long)
        for b, row in enumerate(rows):
            fed = row.continuation[:-1]
            inputs[b, : len(fed)] = torch.tensor(fed, dtype=torch.long)
            # right padding repeats the last real position (learned position tables stay in range)
            positions[b] = row.past + torch.arange(width).clamp(max=len(fed) - 1)
            mask[b, : past - row.past] = 0
        with self._autocast():
            logits = self.model(
                inputs.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=self._row_cache(states, rows, past),
                use_cache=True,
            ).logits
        # the scored positions only: each row's first len(continuation) - 1
        lengths = [len(r.continuation) - 1 for r in rows]
        row_idx = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths)).to(logits.device)
        pos_idx = torch.cat([torch.arange(n) for n in lengths]).to(logits.device)
        logprobs = F.log_softmax(logits[row_idx, pos_idx], dim=-1, dtype=self.softmax_dtype)
        targets = torch.tensor([t for r in rows for t in r.continuation[1:]], device=logits.device)
        token_lp = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        greedy = logprobs.argmax(dim=-1) == targets
        return [(float(lp.sum()), bool(hit.all())) for lp, hit in zip(token_lp.split(lengths), greedy.split(lengths))]
