"""The blockwise calibration engine: inputs it hands to methods are the ones the block really sees."""

from __future__ import annotations

import pytest
import torch

from qeval.models.adapters import get_adapter
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.calibration import BlockInputs, block_output, capture_block_inputs, collect_linear_inputs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_collect_linear_inputs_stops_early_but_hands_over_the_true_inputs(family):
    model = build_tiny_model(family).eval()
    adapter = get_adapter(model, "test")
    batches = [torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    hidden, kwargs = capture_block_inputs(model, adapter, batches)
    block = adapter.get_blocks(model)[0]
    inputs = BlockInputs(hidden, kwargs[0])
    first_stage, last_stage = adapter.sequential()[0], adapter.sequential()[-1]

    # reference: every linear's input from complete forwards with plain hooks
    reference: dict[str, list[torch.Tensor]] = {n: [] for n in adapter.block_linears()}
    handles = [
        block.get_submodule(n).register_forward_pre_hook(lambda _m, args, _n=n: reference[_n].append(args[0].clone()))
        for n in reference
    ]
    with torch.no_grad():
        for h in hidden:
            block_output(block, h, inputs.kwargs)
    for handle in handles:
        handle.remove()

    calls = {n: 0 for n in last_stage}
    counters = [
        block.get_submodule(n).register_forward_pre_hook(lambda _m, _a, _n=n: calls.__setitem__(_n, calls[_n] + 1))
        for n in last_stage
    ]
    got: dict[str, list[torch.Tensor]] = {n: [] for n in first_stage}
    collect_linear_inputs(block, first_stage, inputs, lambda n, x: got[n].append(x.clone()))
    for handle in counters:
        handle.remove()

    for n in first_stage:
        assert len(got[n]) == len(hidden)
        for a, b in zip(got[n], reference[n]):
            torch.testing.assert_close(a, b)
    # the forward stopped before the block's last stage ran
    assert all(c == 0 for c in calls.values()), calls


def test_corpora_are_tokenized_once_per_process_by_content(monkeypatch):
    """Every cell of a sweep asks for calibration batches (and perplexity for the test corpus);
    the corpus is tokenized once, the batches are copies (a method writing into one cannot
    change the cache), and the same seed gives the same windows."""
    from conftest import require_eval_data

    from qeval import data
    from qeval.models.tiny import byte_tokenizer

    require_eval_data()
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    tok = byte_tokenizer()
    calls = []
    original = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    first = data.calibration_batches(tok, "wikitext2_train", 4, 64, seed=0)
    second = data.calibration_batches(tok, "wikitext2_train", 4, 64, seed=0)
    other_seed = data.calibration_batches(tok, "wikitext2_train", 4, 64, seed=1)
    assert len(calls) == 1 and len(data._TOKEN_CACHE) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed))
    corpus = data.tokenized_corpus(tok, "wikitext2_train")
    snapshot = corpus.clone()
    first[0].zero_()
    assert torch.equal(corpus, snapshot)
    assert torch.equal(second[0], data.calibration_batches(tok, "wikitext2_train", 4, 64, seed=0)[0])
