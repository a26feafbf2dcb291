"""The architecture adapter table: where things are inside each model family.

Calibrated methods read only this table; they never test model names by
substring.  Per ``model_type`` it says where the decoder blocks are and,
inside a block, which norm feeds which linears (for scale folding: SmoothQuant,
AWQ, LET, rotation), which linear feeds which (v -> o, up -> down, fc1 -> fc2),
and how the norm applies its weight (Gemma's RMSNorm multiplies by
``1 + weight``, so a scale folded into it must be folded into ``1 + weight``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from qeval.errors import UnsupportedCellError


@dataclass(frozen=True)
class NormGroup:
    """A norm and the linears that read its output (they share the input)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearPair:
    """``prev``'s output feeds ``next``'s input (per channel, so scales can move across)."""

    prev: str
    next: str
    # v -> o only holds when each attention head's V width matches O's input slice,
    # i.e. the scale can be folded per head dimension (also with GQA: repeated heads)
    per_head: bool = False


@dataclass(frozen=True)
class Adapter:
    model_type: str
    blocks: str  # path of the ModuleList of decoder blocks, from the CausalLM
    norm_groups: tuple[NormGroup, ...]
    linear_pairs: tuple[LinearPair, ...]
    norm_kind: str  # rms | rms_one_plus | layernorm
    attention: str = "self_attn"
    final_norm: str = "model.norm"
    extra: dict = field(default_factory=dict)
    # path, inside a block, of the fused-experts module of an MoE family (None: dense MLP).
    # Only GPTQ handles it (per expert, qeval.quant.methods.gptq); methods that fold scales
    # refuse MoE models (qeval.quant.apply.refuse_unsupported_experts)
    experts: str | None = None
    # the norm whose output the router and every expert read (SmoothQuant folds into it)
    experts_norm: str | None = None
    # stages after the norm groups' (execution order), for linears that no norm group names:
    # the dense MLP layers some MoE models keep between their sparse ones
    extra_stages: tuple[tuple[str, ...], ...] = ()
    # a norm reads each norm group's input (False: post-norm-only blocks, OLMo 2): only then can
    # a scale be folded into it (SmoothQuant, AWQ, OmniQuant's LET) or a rotation pass it (QuaRot)
    foldable: bool = True
    why_not_foldable: str = ""

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def sequential(self) -> list[tuple[str, ...]]:
        """Linears of a block in execution order, grouped by shared input:
        [q, k, v], [o], [gate, up], [down] (GPTQ's "true sequential")."""
        stages: list[tuple[str, ...]] = []
        for group, pair in zip(self.norm_groups, self.linear_pairs):
            stages += [group.linears, (pair.next,)]
        return stages + list(self.extra_stages)

    def block_linears(self) -> tuple[str, ...]:
        return tuple(n for stage in self.sequential() for n in stage)


# the linears of a Llama-shaped block, by what reads what (shared by the Llama-like entries,
# their MoE cousins and OLMo 2)
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_V_O = LinearPair("self_attn.v_proj", "self_attn.o_proj", per_head=True)
_UP_DOWN = LinearPair("mlp.up_proj", "mlp.down_proj")

_LLAMA_LIKE = dict(
    blocks="model.layers",
    norm_groups=(NormGroup("input_layernorm", _QKV), NormGroup("post_attention_layernorm", _GATE_UP)),
    linear_pairs=(_V_O, _UP_DOWN),
    norm_kind="rms",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA_LIKE),
    "mistral": Adapter("mistral", **_LLAMA_LIKE),
    "qwen2": Adapter("qwen2", **_LLAMA_LIKE),
    # Gemma 3: norms before *and* after attention/MLP; the ones that feed linears are
    # input_layernorm (-> q, k, v) and pre_feedforward_layernorm (-> gate, up)
    "gemma3_text": Adapter(
        "gemma3_text",
        blocks="model.layers",
        norm_groups=(
            NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        linear_pairs=(
            LinearPair("self_attn.v_proj", "self_attn.o_proj", per_head=True),
            LinearPair("mlp.up_proj", "mlp.down_proj"),
        ),
        norm_kind="rms_one_plus",
    ),
    # OPT (pre-LN variant): LayerNorm with bias; fc1 -> ReLU -> fc2 is not linear, so the
    # fc1 -> fc2 pair only serves methods that scale fc2's *input* (AWQ), not folding into fc1
    "opt": Adapter(
        "opt",
        blocks="model.decoder.layers",
        norm_groups=(
            NormGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormGroup("final_layer_norm", ("fc1",)),
        ),
        linear_pairs=(
            LinearPair("self_attn.v_proj", "self_attn.out_proj", per_head=True),
            LinearPair("fc1", "fc2"),
        ),
        norm_kind="layernorm",
        final_norm="model.decoder.final_layer_norm",
    ),
}
ADAPTERS["gemma3"] = ADAPTERS["gemma3_text"]
# Llama-shaped blocks: Qwen3 adds RMSNorms on each head's queries and keys *after* q_proj and
# k_proj (they see the projections' outputs, which no transform here changes); Granite adds
# scalar multipliers on the embeddings, the residual branches, attention and the logits
# (scalars commute with every per-channel scale and rotation)
ADAPTERS["qwen3"] = Adapter("qwen3", **_LLAMA_LIKE)
ADAPTERS["granite"] = Adapter("granite", **_LLAMA_LIKE)
# Mixture-of-Experts blocks of the Llama shape: attention as Llama's; the MLP is a router and
# fused experts (no norm -> linear group for it: nothing folds into fused experts yet)
_MOE_LLAMA_LIKE = dict(
    _LLAMA_LIKE,
    norm_groups=(NormGroup("input_layernorm", _QKV),),
    linear_pairs=(_V_O,),
    experts="mlp.experts",
    experts_norm="post_attention_layernorm",
    extra_stages=(("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)
ADAPTERS["mixtral"] = Adapter("mixtral", **_MOE_LLAMA_LIKE)
ADAPTERS["qwen3_moe"] = Adapter("qwen3_moe", **_MOE_LLAMA_LIKE)
# Granite MoE (granite-3.0-1b-a400m, -3b-a800m): Llama-shaped attention with Granite's scalar
# multipliers, the experts under block_sparse_moe
ADAPTERS["granitemoe"] = Adapter("granitemoe", **dict(_MOE_LLAMA_LIKE, experts="block_sparse_moe.experts"))
# OLMo 2 normalizes the outputs of attention and MLP (post-norms) and nothing normalizes their
# inputs: GPTQ needs only the blocks and the execution order of the linears; methods that fold a
# scale into the norm before a linear, or rotate through it, have nowhere to go
ADAPTERS["olmo2"] = Adapter(
    "olmo2",
    **dict(_LLAMA_LIKE, norm_groups=(NormGroup("", _QKV), NormGroup("", _GATE_UP))),
    foldable=False,
    why_not_foldable="OLMo 2 normalizes after attention and MLP (post-norms) and not before, so no norm reads "
    "the linears' inputs: a scale has nowhere to fold, and a rotation does not commute with the post-norms",
)
# Gemma 2: Gemma 3's block layout (pre- and post-norms, RMSNorm multiplying by 1 + weight)
ADAPTERS["gemma2"] = dataclasses.replace(ADAPTERS["gemma3_text"], model_type="gemma2")


# What stands between a family and the adapter table: said in the refusal, so that a user
# reads the architectural reason, not only "no entry"
NO_ADAPTER_BECAUSE: dict[str, str] = {
    "phi3": "its q/k/v and gate/up projections are fused into one linear each (qkv_proj, gate_up_proj), so the "
    "v -> o and up -> down scale pairs are row slices of a linear, which the table cannot name yet",
    "gpt_neox": "its attention and MLP read the same LayerNorm'd input in parallel and q/k/v are one fused "
    "linear; LayerNorm subtracts the mean, which does not commute with a rotation",
    "falcon": "q/k/v are one fused linear and attention and MLP run in parallel off LayerNorms",
    "llama4_text": "its experts are fused 3-D tensors, which calibrated methods do not handle yet",
    "gpt_oss": "its experts are fused 3-D tensors, which calibrated methods do not handle yet",
    "deepseek_v3": "its experts are fused 3-D tensors and its attention is multi-head latent attention",
    "mamba": "its blocks are state-space mixers, not attention and MLP",
    "falcon_h1": "each block runs a state-space mixer beside attention",
}


def get_adapter(model: nn.Module, method: str = "this method") -> Adapter:
    """The adapter for ``model``'s family, or a clear refusal naming the family and why."""
    return adapter_for(getattr(model.config, "model_type", None), method)


def get_folding_adapter(model: nn.Module, method: str) -> Adapter:
    """:func:`folding_adapter` for a loaded model."""
    return folding_adapter(getattr(model.config, "model_type", None), method)


def folding_adapter(model_type: str | None, method: str) -> Adapter:
    """The adapter of ``model_type`` for a method that folds scales into norms or rotates
    through them; UnsupportedCellError with the architectural reason where it cannot."""
    adapter = adapter_for(model_type, method)
    if not adapter.foldable:
        raise UnsupportedCellError(f"{method} on model_type {model_type!r}: {adapter.why_not_foldable}")
    return adapter


def adapter_for(model_type: str | None, method: str = "this method") -> Adapter:
    """The adapter of ``model_type``, or UnsupportedCellError naming it and why (usable before
    any weight loads: the model type is in the config)."""
    if model_type not in ADAPTERS:
        why = f": {NO_ADAPTER_BECAUSE[model_type]}" if model_type in NO_ADAPTER_BECAUSE else ""
        raise UnsupportedCellError(
            f"{method} needs the architecture adapter table, which has no entry for model_type "
            f"{model_type!r}{why} (supported: {', '.join(sorted(ADAPTERS))}); add one in qeval/models/adapters.py"
        )
    return ADAPTERS[model_type]
