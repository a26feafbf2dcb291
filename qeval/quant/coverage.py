"""What a quantized model actually quantized: a coverage account of its weights.

A spec that says W4 must leave no weight silently in full precision.  Every parameter of two
or more dimensions is sorted by what it is, from the model's structure (the modules around it),
not from names alone:

* ``attention``: inside an attention module (its class name says Attention, or a path segment
  ``attn``/``attention``); multi-head latent attention's projections included;
* ``experts``: a fused-experts tensor (:mod:`qeval.quant.experts`) or a linear inside an
  ``experts`` list;
* ``router``: the module that scores the experts (stays in full precision by default);
* ``mlp``: inside an MLP / feed-forward module (a shared expert is an MLP);
* ``state_space``: inside a state-space mixer (Mamba-style);
* ``embeddings`` and ``head``: the input embeddings (and position embeddings) and the output
  projection;
* ``other``: anything else.

Each is then *quantized* (a ``QuantLinear``, a fused-experts tensor marked by
``quantize_model``, the embedding table when asked for), *excluded by config* (the head, the
embeddings and the routers unless the spec asks for them), *unsupported* with a stated reason
(convolution kernels, state-space parameters that are not matmul weights), or *left* — eligible
and untouched.  :func:`check` refuses a cell whose left share exceeds :data:`MAX_LEFT_SHARE`,
naming the tensors, so a partial quantization can never be reported as the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qeval.config import QuantSpec, quantized
from qeval.quant.experts import EXPERT_INPUTS_ATTR, find_fused_experts, routers
from qeval.quant.linear import QuantLinear
from qeval.quant.typing_helpers import input_embeddings, output_embeddings

KINDS = ("attention", "mlp", "experts", "router", "state_space", "embeddings", "head", "other")
MAX_LEFT_SHARE = 0.02  # eligible weights that may stay untouched before a cell is refused
QUANTIZED_PARAMS_ATTR = "_qeval_quantized_params"  # set by quantize_model on a fused-experts module
# {tensor name: experts rounded to nearest for lack of routed calibration tokens}, set by GPTQ
EXPERT_FALLBACKS_ATTR = "_qeval_expert_fallbacks"
EXAMPLES = 4  # tensor names listed per (kind, status, reason) in a record

_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention|cross_attn)(\.|$)")
_MLP = re.compile(r"(^|\.)(mlp|ffn|feed_forward|shared_experts?|fc1|fc2|dense_h_to_4h|dense_4h_to_h)(\.|$)")
_EXPERT_LIST = re.compile(r"(^|\.)experts\.\d+(\.|$)")


class CoverageError(RuntimeError):
    """The quantized model leaves more eligible weights in full precision than allowed."""


@dataclass(frozen=True)
class Tensor:
    name: str  # the parameter's path
    kind: str
    params: int
    status: str  # quantized | excluded | unsupported | left
    reason: str = ""


@dataclass
class Coverage:
    """Per-tensor statuses and their sums; ``as_record`` is what a cell's record keeps."""

    tensors: list[Tensor] = field(default_factory=list)
    # names of the quantized weights whose matmul inputs are quantized too (WA specs)
    inputs_quantized: set[str] = field(default_factory=set)
    # how the fused expert tensors were quantized: mark -> tensors, and experts that a
    # calibrated method rounded to nearest for lack of routed tokens (summed over tensors)
    expert_marks: dict[str, int] = field(default_factory=dict)
    expert_fallbacks: int = 0
    # quantized weights of a WA spec whose inputs stay in full precision, and why
    inputs_left: dict[str, str] = field(default_factory=dict)

    @property
    def inputs_share(self) -> float:
        """Share (by weight count) of the quantized weights whose inputs are quantized."""
        total = self.count("quantized")
        done = sum(t.params for t in self.tensors if t.status == "quantized" and t.name in self.inputs_quantized)
        return done / total if total else 1.0

    def count(self, status: str, kind: str | None = None) -> int:
        return sum(t.params for t in self.tensors if t.status == status and kind in (None, t.kind))

    @property
    def eligible(self) -> int:
        return self.count("quantized") + self.count("left")

    @property
    def share(self) -> float:
        """Quantized share of the eligible weights (1.0 when nothing is eligible)."""
        return self.count("quantized") / self.eligible if self.eligible else 1.0

    def as_record(self) -> dict[str, Any]:
        kinds: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            kinds.setdefault(t.kind, {"quantized": 0, "excluded": 0, "unsupported": 0, "left": 0})[t.status] += t.params
        groups: dict[tuple[str, str, str], list[Tensor]] = {}
        for t in self.tensors:
            if t.status != "quantized":
                groups.setdefault((t.kind, t.status, t.reason), []).append(t)
        full = [
            {
                "kind": kind,
                "status": status,
                "reason": reason,
                "params": sum(t.params for t in ts),
                "tensors": len(ts),
                "examples": [t.name for t in ts[:EXAMPLES]],
            }
            for (kind, status, reason), ts in sorted(groups.items())
        ]
        out = {
            "eligible": self.eligible,
            "quantized": self.count("quantized"),
            "share": round(self.share, 6),
            "kinds": {k: kinds[k] for k in KINDS if k in kinds},
            "full_precision": full,
        }
        if self.inputs_quantized:
            out["inputs_quantized_share"] = round(self.inputs_share, 6)
        if self.inputs_left:
            by_reason: dict[str, list[str]] = {}
            for name, why in sorted(self.inputs_left.items()):
                by_reason.setdefault(why, []).append(name)
            out["inputs_full_precision"] = [
                {"reason": why, "tensors": len(names), "examples": names[:EXAMPLES]} for why, names in by_reason.items()
            ]
        if self.expert_marks:
            out["experts"] = {"how": dict(self.expert_marks), "rounded_to_nearest": self.expert_fallbacks}
        return out

    def summary(self) -> str:
        """One line: the quantized share and each kind's quantized share."""
        parts = []
        for kind in KINDS:
            q, left = self.count("quantized", kind), self.count("left", kind)
            if q + left:
                parts.append(f"{kind} {q / (q + left):.0%}")
        return f"{self.share:.1%} of {self.eligible:,} eligible weights quantized ({', '.join(parts)})"


def _kind(path: str, classes: list[str], router_paths: set[str], expert_paths: set[str]) -> str:
    """What the module at ``path`` (ancestor class names ``classes``, outermost first) is."""
    if path in router_paths:
        return "router"
    if path in expert_paths or _EXPERT_LIST.search(path):
        return "experts"
    if any("Attention" in c for c in classes) or _ATTENTION.search(path):
        return "attention"
    if any(s in c for c in classes for s in ("Mamba", "Mixer", "SSM")) and not _MLP.search(path):
        return "state_space"
    if any(s in c for c in classes for s in ("MLP", "FeedForward")) or _MLP.search(path):
        return "mlp"
    return "other"


def account(model: nn.Module, spec: QuantSpec) -> Coverage:
    """The coverage account of ``model`` as quantized under ``spec``."""
    head = output_embeddings(model) if hasattr(model, "get_output_embeddings") else None
    emb = input_embeddings(model) if hasattr(model, "get_input_embeddings") else None
    fused = find_fused_experts(model)
    expert_paths = {e.path for e in fused}
    router_paths = set(routers(model, fused))
    modules = dict(model.named_modules())
    seen: set[int] = set()  # tied weights are counted once (under the first name)
    out = Coverage()
    for path, module in modules.items():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
        if not own:
            continue
        parts = path.split(".") if path else []
        classes = [type(modules[".".join(parts[:i])]).__name__ for i in range(len(parts) + 1)]
        kind = _kind(path, classes, router_paths, expert_paths)
        marked = getattr(module, QUANTIZED_PARAMS_ATTR, None) or {}
        for mark in marked.values():
            out.expert_marks[mark] = out.expert_marks.get(mark, 0) + 1
        out.expert_fallbacks += sum((getattr(module, EXPERT_FALLBACKS_ATTR, None) or {}).values())
        expert_inputs = getattr(module, EXPERT_INPUTS_ATTR, None) or {}
        for pname, param in own:
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{path}.{pname}" if path else pname
            k, status, reason = kind, "left", ""
            if module is head:
                k = "head"
                if isinstance(module, QuantLinear):
                    status = "quantized"
                else:
                    status, reason = "excluded", "output projection (quant.quantize_lm_head=false)"
            elif isinstance(module, nn.Embedding):
                k = "embeddings"
                if module is emb and spec.quantize_embeddings:
                    status = "quantized"
                elif module is emb:
                    status, reason = "excluded", "input embeddings (quant.quantize_embeddings=false)"
                else:
                    status, reason = "excluded", "position or type embeddings: lookup tables, never quantized"
            elif isinstance(module, QuantLinear) and pname == "weight":
                status = "quantized"
            elif pname in marked:
                status = "quantized"
            elif path in expert_paths and param.dim() == 2:
                status, reason = "excluded", "per-expert bias: biases stay in full precision, as linear biases do"
            elif kind == "router":
                status, reason = (
                    "excluded",
                    "router: expert scores stay in full precision (quant.quantize_router=false)",
                )
            elif isinstance(module, nn.modules.conv._ConvNd):
                status, reason = "unsupported", f"{type(module).__name__} kernel: qeval quantizes matmul weights"
            elif kind == "state_space" and not isinstance(module, nn.Linear):
                status, reason = "unsupported", f"state-space parameter {pname!r}: not a matmul weight"
            out.tensors.append(Tensor(name, k, int(param.numel()), status, reason))
            if status == "quantized" and (
                (isinstance(module, QuantLinear) and module.input_quantizer is not None) or pname in expert_inputs
            ):
                out.inputs_quantized.add(name)
            elif status == "quantized" and quantized(spec.a) and isinstance(module, QuantLinear):
                out.inputs_left[name] = getattr(module, INPUT_NOT_CALLED_ATTR, "") or "input not quantized"
    return out


# on a QuantLinear of a WA cell whose forward the model never calls (it reads .weight itself, as
# Mamba does with dt_proj): why its input has no quantizer
INPUT_NOT_CALLED_ATTR = "_qeval_input_not_called"


def state_space_mixers(model: nn.Module) -> int:
    """Modules that keep a recurrent state instead of keys and values (Mamba-style mixers):
    what a KV spec does not quantize on a hybrid model, and says so in the record."""
    return sum(1 for m in model.modules() if type(m).__name__.endswith("Mixer") and any(
        s in type(m).__name__ for s in ("Mamba", "SSM", "H1")))  # fmt: skip


def check(coverage: Coverage, spec: QuantSpec, max_left: float = MAX_LEFT_SHARE) -> None:
    """Refuse a weight-quantized model that leaves more than ``max_left`` of its eligible weights
    in full precision (CoverageError naming the largest untouched tensors)."""
    if not quantized(spec.w) or not coverage.eligible:
        return
    if quantized(spec.a) and coverage.inputs_share < 1.0 - max_left:
        plain = [t for t in coverage.tensors if t.status == "quantized" and t.name not in coverage.inputs_quantized]
        plain.sort(key=lambda t: -t.params)
        raise CoverageError(
            f"the spec asks for {spec.label}, but the inputs of {len(plain)} quantized weights "
            f"({1 - coverage.inputs_share:.1%} of them by size) stay in full precision: "
            + ", ".join(t.name for t in plain[:6])
            + ("" if len(plain) <= 6 else f" and {len(plain) - 6} more")
            + "; nothing was evaluated"
        )
    left = coverage.count("left")
    if left / coverage.eligible <= max_left:
        return
    untouched = sorted((t for t in coverage.tensors if t.status == "left"), key=lambda t: -t.params)
    names = ", ".join(f"{t.name} ({t.kind}, {t.params:,})" for t in untouched[:6])
    more = f" and {len(untouched) - 6} more" if len(untouched) > 6 else ""
    raise CoverageError(
        f"the spec asks for {spec.label} weights, but {left:,} of {coverage.eligible:,} eligible weights "
        f"({left / coverage.eligible:.1%}) were left in full precision: {names}{more}. qeval does not "
        "know how to quantize them on this architecture; nothing was evaluated"
    )
