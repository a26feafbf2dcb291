"""Tensor statistics that explain why a tensor type is hard to quantize.

Per decoder layer, for the weights of each linear, the input activations of each linear
(on calibration data) and the key/value states handed to the KV cache:

* ``absmax``: the largest magnitude (what a per-tensor scale must cover);
* ``std``: the spread of typical values (what the grid must resolve);
* ``kurtosis``: Pearson kurtosis of all elements (3 for a Gaussian); heavy tails mean a few
  huge values stretch the grid that every other value must share;
* ``outlier_share``: the share of channels whose largest magnitude exceeds
  ``OUTLIER_FACTOR`` times the median channel's largest magnitude (channels are input
  features for weights and activations, the head dimension for K/V).  Outlier *channels*
  are the structure SmoothQuant migrates and rotations spread.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OUTLIER_FACTOR = 6.0


def summarize(x: torch.Tensor) -> dict[str, float]:
    """Statistics of a tensor whose last dimension is the channel dimension."""
    flat = x.detach().float().reshape(-1, x.shape[-1])
    mean = flat.mean()
    centered = flat - mean
    var = centered.pow(2).mean()
    channel_max = flat.abs().amax(dim=0)
    median = channel_max.median().clamp(min=1e-12)
    return {
        "absmax": float(flat.abs().max()),
        "std": float(var.sqrt()),
        "kurtosis": float(centered.pow(4).mean() / var.clamp(min=1e-24).pow(2)),
        "outlier_share": float((channel_max > OUTLIER_FACTOR * median).float().mean()),
        "channel_absmax_ratio": float(channel_max.max() / median),
    }


class _Accumulator:
    """Running statistics over calibration batches (per-batch moments combined exactly)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1 = self.s2 = self.s3 = self.s4 = 0.0
        self.channel_max: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().double().reshape(-1, x.shape[-1])
        self.n += flat.numel()
        self.s1 += float(flat.sum())
        self.s2 += float(flat.pow(2).sum())
        self.s3 += float(flat.pow(3).sum())
        self.s4 += float(flat.pow(4).sum())
        cm = flat.abs().amax(dim=0).float()
        self.channel_max = cm if self.channel_max is None else torch.maximum(self.channel_max, cm)

    def result(self) -> dict[str, float]:
        n = self.n
        mu = self.s1 / n
        var = self.s2 / n - mu**2
        m4 = self.s4 / n - 4 * mu * self.s3 / n + 6 * mu**2 * self.s2 / n - 3 * mu**4
        median = float(self.channel_max.median().clamp(min=1e-12))
        return {
            "absmax": float(self.channel_max.max()),
            "std": max(var, 0.0) ** 0.5,
            "kurtosis": m4 / max(var, 1e-24) ** 2,
            "outlier_share": float((self.channel_max > OUTLIER_FACTOR * median).float().mean()),
            "channel_absmax_ratio": float(self.channel_max.max()) / median,
        }


def _layer_of(name: str, blocks_path: str) -> int | None:
    if not name.startswith(blocks_path + "."):
        return None
    return int(name[len(blocks_path) + 1 :].split(".")[0])


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[torch.Tensor], blocks_path: str) -> list[dict]:
    """One row per (layer, tensor kind, module) with the statistics above."""
    from qeval.quant.kv import observe_cached_states

    rows = []
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and _layer_of(n, blocks_path) is not None
    }
    for name, module in linears.items():
        # a weight's channels are its input features (last dimension): the ones activations share
        rows.append(
            {
                "layer": _layer_of(name, blocks_path),
                "kind": "weight",
                "module": name[len(blocks_path) + 1 :].split(".", 1)[1],
                **summarize(module.weight),
            }
        )
    acts = {name: _Accumulator() for name in linears}
    kv: dict[tuple[int, str], _Accumulator] = {}

    def observe(layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        kv.setdefault((layer_idx, "key"), _Accumulator()).add(keys)
        kv.setdefault((layer_idx, "value"), _Accumulator()).add(values)

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: acts[n].add(args[0])) for n, m in linears.items()]
    try:
        observe_cached_states(model, batches, observe)
    finally:
        for h in hooks:
            h.remove()
    for name, acc in acts.items():
        rows.append(
            {
                "layer": _layer_of(name, blocks_path),
                "kind": "activation",
                "module": name[len(blocks_path) + 1 :].split(".", 1)[1],
                **acc.result(),
            }
        )
    for (layer, kind), acc in sorted(kv.items()):
        rows.append({"layer": layer, "kind": kind, "module": "cache", **acc.result()})
    return rows
