"""``qeval-support``: which methods and tensor types run on which model family, from the code.

Nothing here is a hand-kept table.  For every family with a tiny model (qeval.models.tiny)
it quantizes that model with every method (RTN, GPTQ, AWQ, SmoothQuant, OmniQuant, QuaRot, HQQ,
SpinQuant)
at one spec per tensor type (W4g128, W8A8, KV4, or those given), on two random calibration
windows, and reports what happened: **ok** with the share of eligible weights quantized (the
coverage account, qeval.quant.coverage) and that the logits stayed finite, or the refusal
qeval raised and why (a method that does not make that tensor type, a family missing from
the adapter table, fused experts a method cannot yet handle, a model without KV layers, a
coverage below 98 %).  So the matrix the README shows is the behaviour of this version.

    qeval-support                       # every family, every method, w4g128 / w8a8 / kv4
    qeval-support --families llama,mixtral --methods rtn,gptq --quants w4g128,kv4
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qeval.errors import UnsupportedCellError

DEFAULT_METHODS = ("rtn", "gptq", "awq", "smoothquant", "omniquant", "quarot", "hqq", "spinquant")
DEFAULT_QUANTS = ("w4g128", "w8a8", "kv4")


@dataclass(frozen=True)
class Outcome:
    """One family × method × spec: ok (with the quantized share) or refused (with why)."""

    ok: bool
    detail: str  # "100%" for ok W cells, "" for ok others; the reason when refused


def _spec(preset: str):  # -> QuantSpec
    """The preset's QuantSpec exactly as a sweep cell gets it: composed by Hydra (defaults
    lists included) and typed at the cell boundary."""
    from qeval.cell import build_cell
    from qeval.cli import compose_config

    return build_cell(compose_config([f"quant={preset}", "model=tiny-llama", "suite=tiny"])).quant


def try_cell(model: torch.nn.Module, spec, method: str, calibration: list[torch.Tensor]) -> Outcome:
    """Quantize a copy of ``model`` as the runner would, and say what happened."""
    from qeval.quant import coverage
    from qeval.quant.apply import quantize_model
    from qeval.quant.methods import ALIASES, METHODS
    from qeval.quant.recipe import Recipe

    steps = [METHODS[s]() for s in ALIASES.get(method, (method,))]
    recipe = Recipe.of(steps)
    work = copy.deepcopy(model)
    try:
        recipe.check_supported(spec.tensor_type, getattr(work.config, "model_type", None))
        quantize_model(work, spec, recipe, lambda: calibration)
        account = coverage.account(work, spec)
        coverage.check(account, spec)
        with torch.no_grad():
            logits = work(calibration[0][:, :16]).logits
        if not torch.isfinite(logits).all():
            return Outcome(False, "non-finite logits after quantization")
        share = f"{account.share:.0%}" if spec.w.bits < 16 else ""
        return Outcome(True, share)
    except (UnsupportedCellError, coverage.CoverageError) as err:
        return Outcome(False, str(err))


def matrix(families: Sequence[str], methods: Sequence[str], quants: Sequence[str], seed: int = 0):
    """{family: {method: {quant: Outcome}}}, trying each combination on the tiny model."""
    from qeval.models.tiny import VOCAB_SIZE, build_tiny_model

    specs = {q: _spec(q) for q in quants}
    generator = torch.Generator().manual_seed(seed)
    calibration = [torch.randint(3, VOCAB_SIZE, (1, 64), generator=generator) for _ in range(2)]
    out: dict[str, dict[str, dict[str, Outcome]]] = {}
    for family in families:
        model = build_tiny_model(family, seed=seed)
        out[family] = {m: {q: try_cell(model, specs[q], m, calibration) for q in quants} for m in methods}
    return out


def render(result: dict[str, dict[str, dict[str, Outcome]]], quants: Sequence[str]) -> str:
    """A Markdown table (family × method, a column per spec) and the refusals' reasons, each
    written once and numbered."""
    reasons: dict[str, int] = {}
    lines = ["| family | method | " + " | ".join(quants) + " |", "|---|---|" + "---|" * len(quants)]
    for family, methods in result.items():
        for method, cells in methods.items():
            row = []
            for q in quants:
                o = cells[q]
                if o.ok:
                    row.append("ok" + (f" ({o.detail})" if o.detail else ""))
                else:
                    n = reasons.setdefault(o.detail, len(reasons) + 1)
                    row.append(f"refused [{n}]")
            lines.append(f"| {family} | {method} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"[{n}] {reason}" for reason, n in reasons.items()]
    return "\n".join(lines)


def render_compact(result: dict[str, dict[str, dict[str, Outcome]]], quants: Sequence[str]) -> str:
    """One row per family, a column per spec listing the methods that run (the README's table)."""
    lines = ["| family | " + " | ".join(quants) + " |", "|---|" + "---|" * len(quants)]
    for family, methods in result.items():
        cols = [", ".join(m for m, cells in methods.items() if cells[q].ok) or "—" for q in quants]
        lines.append(f"| {family} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from qeval.models.tiny import ALL_TINY_FAMILIES

    parser = argparse.ArgumentParser(prog="qeval-support", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(ALL_TINY_FAMILIES), help="comma-separated tiny families")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--quants", default=",".join(DEFAULT_QUANTS), help="quant presets, one per column")
    parser.add_argument("--compact", action="store_true", help="one row per family: the methods that run")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in ALL_TINY_FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}: choose from {', '.join(ALL_TINY_FAMILIES)}")
    quants = [q for q in args.quants.split(",") if q]
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    result = matrix(families, methods, quants)
    print(render_compact(result, quants) if args.compact else render(result, quants))
    print(f"\n(tried on tiny random models of each family in {time.perf_counter() - t0:.0f} s: qeval-support)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
