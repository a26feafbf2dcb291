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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    # where ``prev`` is a fused linear (Phi-3's qkv_proj, gate_up_proj), the rows of its output
    # that ``next`` reads, from the model config (None: every row)
    prev_rows: Callable[[Any], slice] | None = None

    def rows(self, config: Any) -> slice:
        """The output rows of ``prev`` that feed ``next``."""
        return slice(None) if self.prev_rows is None else self.prev_rows(config)


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
    # path, inside a block, of the fused-experts module of an MoE family (None: dense MLP);
    # methods that handle fused experts say so (Step.handles_experts), the others are refused
    # (qeval.quant.apply.refuse_unsupported_experts)
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
    # the linears of a block in execution order, grouped by shared input, where norm groups and
    # pairs do not give it (blocks without a norm before each linear, parallel blocks,
    # state-space mixers); empty: derived from them (see sequential)
    stages: tuple[tuple[str, ...], ...] = ()
    # why a rotation of the residual stream (QuaRot) cannot be applied, beyond the norm kind
    # ("" : it can wherever the norms are plain pre-norm RMSNorms)
    why_not_rotatable: str = ""

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def sequential(self) -> list[tuple[str, ...]]:
        """Linears of a block in execution order, grouped by shared input:
        [q, k, v], [o], [gate, up], [down] (GPTQ's "true sequential")."""
        if self.stages:
            return list(self.stages) + list(self.extra_stages)
        stages: list[tuple[str, ...]] = []
        for group, pair in zip(self.norm_groups, self.linear_pairs):
            stages += [group.linears, (pair.next,)]
        return stages + list(self.extra_stages)

    def block_linears(self) -> tuple[str, ...]:
        return tuple(n for stage in self.sequential() for n in stage)

    def norm_groups_of(self, block: nn.Module) -> list[NormGroup]:
        """The norm groups of this block, each with the linears the block has (an MoE block has
        no dense gate/up, a dense one no shared expert); groups with none are left out.  A
        group whose linears exist but whose norm does not is a variant of the family the table
        does not describe (Falcon's single-norm blocks): refused, never silently unscaled."""
        out = []
        for group in self.norm_groups:
            linears = present(block, group.linears)
            if not linears:
                continue
            if not present(block, [group.norm]):
                raise UnsupportedCellError(
                    f"model_type {self.model_type!r}: this variant has no {group.norm!r} before {linears[0]!r}; "
                    "the adapter table (qeval/models/adapters.py) describes the layout with it"
                )
            out.append(NormGroup(group.norm, tuple(linears)))
        return out

    def pairs_of(self, block: nn.Module) -> list[LinearPair]:
        """The linear pairs both of whose linears this block has."""
        return [p for p in self.linear_pairs if len(present(block, [p.prev, p.next])) == 2]


def present(block: nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """The names of ``names`` that exist in ``block``: an adapter names the linears of every
    kind of block a family has (Llama 4 and DeepSeek-V3 mix dense and MoE blocks), and each
    method keeps those of the block at hand."""
    out = []
    for name in names:
        try:
            block.get_submodule(name)
        except AttributeError:
            continue
        out.append(name)
    return out


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
_MOE_NOT_ROTATABLE = (
    "rotating its residual stream would have to rotate every fused expert tensor and the router and "
    "apply an online Hadamard inside the experts' forward, which qeval's rotation does not do"
)
# Mixture-of-Experts blocks of the Llama shape: attention as Llama's; the MLP is a router and
# fused experts (no norm -> linear group for it: nothing folds into fused experts yet)
_MOE_LLAMA_LIKE = dict(
    _LLAMA_LIKE,
    norm_groups=(NormGroup("input_layernorm", _QKV),),
    linear_pairs=(_V_O,),
    experts="mlp.experts",
    experts_norm="post_attention_layernorm",
    extra_stages=(("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    why_not_rotatable=_MOE_NOT_ROTATABLE,
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
    **dict(_LLAMA_LIKE, norm_groups=(), linear_pairs=()),
    stages=(_QKV, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",)),
    foldable=False,
    why_not_foldable="OLMo 2 normalizes after attention and MLP (post-norms) and not before, so no norm reads "
    "the linears' inputs: a scale has nowhere to fold, and a rotation does not commute with the post-norms",
)
# Gemma 2: Gemma 3's block layout (pre- and post-norms, RMSNorm multiplying by 1 + weight)
ADAPTERS["gemma2"] = dataclasses.replace(ADAPTERS["gemma3_text"], model_type="gemma2")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _phi3_v_rows(config: Any) -> slice:
    """V's rows of Phi-3's fused qkv_proj: [q (heads x head_dim) | k | v (kv_heads x head_dim)]."""
    q = config.num_attention_heads * _head_dim(config)
    kv = (config.num_key_value_heads or config.num_attention_heads) * _head_dim(config)
    return slice(q + kv, q + 2 * kv)


def _up_half(config: Any) -> slice:
    """The up half of a fused gate_up_proj ([gate | up], Phi-3's MLP chunks it in two)."""
    return slice(config.intermediate_size, 2 * config.intermediate_size)


# Phi-3/Phi-4: Llama's block with q/k/v fused into qkv_proj and gate/up into gate_up_proj; the
# v -> o and up -> down pairs are row slices of the fused linears (contiguous: [q | k | v] and
# [gate | up])
ADAPTERS["phi3"] = Adapter(
    "phi3",
    blocks="model.layers",
    norm_groups=(
        NormGroup("input_layernorm", ("self_attn.qkv_proj",)),
        NormGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    linear_pairs=(
        LinearPair("self_attn.qkv_proj", "self_attn.o_proj", per_head=True, prev_rows=_phi3_v_rows),
        LinearPair("mlp.gate_up_proj", "mlp.down_proj", prev_rows=_up_half),
    ),
    norm_kind="rms",
)
# LayerNorm families with fused query_key_value whose V rows interleave with Q and K per head
# (GPT-NeoX: [heads, 3, head_dim]; Falcon's new decoder: [kv_heads, q_per_kv + 2, head_dim]) and a
# GELU MLP: the norms take a scale (SmoothQuant, AWQ, LET; LayerNorm's bias too), no linear pair
# does (V is not a contiguous row slice, GELU is not homogeneous), and a rotation does not pass
# LayerNorm's mean subtraction
_LAYERNORM_FUSED_QKV = "its LayerNorm subtracts the mean, which does not commute with a rotation"
ADAPTERS["gpt_neox"] = Adapter(
    "gpt_neox",
    blocks="gpt_neox.layers",
    # attention and MLP each read their own LayerNorm of the block input (parallel residual) or
    # of the input plus attention (sequential): either way the norm feeds the linear
    norm_groups=(
        NormGroup("input_layernorm", ("attention.query_key_value",)),
        NormGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
    linear_pairs=(),
    norm_kind="layernorm",
    attention="attention",
    final_norm="gpt_neox.final_layer_norm",
    stages=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    why_not_rotatable=_LAYERNORM_FUSED_QKV,
)
# Falcon's new decoder architecture (Falcon-40B/180B: two LayerNorms in parallel, ln_attn and
# ln_mlp); the older single-norm variants have no entry (refused by name: see norm_groups_of)
ADAPTERS["falcon"] = Adapter(
    "falcon",
    blocks="transformer.h",
    norm_groups=(
        NormGroup("ln_attn", ("self_attention.query_key_value",)),
        NormGroup("ln_mlp", ("mlp.dense_h_to_4h",)),
    ),
    linear_pairs=(),
    norm_kind="layernorm",
    attention="self_attention",
    final_norm="transformer.ln_f",
    stages=(
        ("self_attention.query_key_value",),
        ("self_attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    why_not_rotatable=_LAYERNORM_FUSED_QKV,
)
# Llama 4: Llama attention (with an L2 norm on q/k after the projections); each MoE block has a
# router, fused experts reading x * router score, and a shared expert reading the same norm
# output; dense blocks (interleave_moe_layer_step > 1) hold feed_forward.{gate,up,down}_proj
ADAPTERS["llama4_text"] = Adapter(
    "llama4_text",
    blocks="model.layers",
    norm_groups=(
        NormGroup("input_layernorm", _QKV),
        NormGroup(
            "post_attention_layernorm",
            (
                "feed_forward.shared_expert.gate_proj",
                "feed_forward.shared_expert.up_proj",
                "feed_forward.gate_proj",
                "feed_forward.up_proj",
            ),
        ),
    ),
    linear_pairs=(
        _V_O,
        LinearPair("feed_forward.shared_expert.up_proj", "feed_forward.shared_expert.down_proj"),
        LinearPair("feed_forward.up_proj", "feed_forward.down_proj"),
    ),
    norm_kind="rms",
    stages=(
        _QKV,
        ("self_attn.o_proj",),
        (
            "feed_forward.shared_expert.gate_proj",
            "feed_forward.shared_expert.up_proj",
            "feed_forward.gate_proj",
            "feed_forward.up_proj",
        ),
        ("feed_forward.shared_expert.down_proj",),
        ("feed_forward.down_proj",),
    ),
    experts="feed_forward.experts",
    experts_norm="post_attention_layernorm",
    why_not_rotatable=_MOE_NOT_ROTATABLE,
)
# GPT-OSS: Llama-shaped attention with biases and per-head sinks (a learned logit in the softmax:
# still linear in V, so v -> o scales fold); experts as x @ W[e] + b[e] with a clamped GLU
ADAPTERS["gpt_oss"] = Adapter(
    "gpt_oss",
    blocks="model.layers",
    norm_groups=(NormGroup("input_layernorm", _QKV),),
    linear_pairs=(_V_O,),
    norm_kind="rms",
    experts="mlp.experts",
    experts_norm="post_attention_layernorm",
    why_not_rotatable=_MOE_NOT_ROTATABLE,
)
# DeepSeek-V3 (and V2): multi-head latent attention.  The block input's norm feeds q_a_proj (or
# q_proj without a query LoRA) and kv_a_proj_with_mqa; q_a_layernorm feeds q_b_proj and
# kv_a_layernorm feeds kv_b_proj (the compressed KV, not the rope key).  kv_b_proj's value rows
# interleave with the no-rope keys per head, so no v -> o pair.  The first first_k_dense_replace
# blocks have a dense MLP, the rest a router, fused experts and shared experts
_DS_GATE_UP = ("mlp.gate_proj", "mlp.up_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
ADAPTERS["deepseek_v3"] = Adapter(
    "deepseek_v3",
    blocks="model.layers",
    norm_groups=(
        NormGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
        NormGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
        NormGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
        NormGroup("post_attention_layernorm", _DS_GATE_UP),
    ),
    linear_pairs=(
        LinearPair("mlp.up_proj", "mlp.down_proj"),
        LinearPair("mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
    ),
    norm_kind="rms",
    stages=(
        ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
        ("self_attn.q_b_proj",),
        ("self_attn.kv_b_proj",),
        ("self_attn.o_proj",),
        _DS_GATE_UP,
        ("mlp.down_proj",),
        ("mlp.shared_experts.down_proj",),
    ),
    experts="mlp.experts",
    experts_norm="post_attention_layernorm",
    why_not_rotatable="its values come out of kv_b_proj interleaved per head with the keys' no-rope part, "
    "so the per-head value rotation has no rows to act on; and " + _MOE_NOT_ROTATABLE,
)
# Mamba: an RMSNorm before each mixer; in_proj reads it, x_proj reads the convolved (SiLU) half
# of in_proj's output, out_proj the gated scan output.  dt_proj is never called as a module
# (the mixer multiplies by dt_proj.weight itself), so no hook sees its input: it is rounded to
# nearest after GPTQ (round_remaining), not given a Hessian it cannot have
ADAPTERS["mamba"] = Adapter(
    "mamba",
    blocks="backbone.layers",
    norm_groups=(NormGroup("norm", ("mixer.in_proj",)),),
    linear_pairs=(),
    norm_kind="rms",
    attention="mixer",
    final_norm="backbone.norm_f",
    stages=(("mixer.in_proj",), ("mixer.x_proj",), ("mixer.out_proj",)),
    why_not_rotatable="its blocks are state-space mixers: QuaRot's rotation is defined for attention and MLP",
)
# Falcon-H1: one norm feeds attention and a Mamba mixer side by side (times scalar multipliers,
# which commute with per-channel scales), then a Llama MLP behind pre_ff_layernorm
ADAPTERS["falcon_h1"] = Adapter(
    "falcon_h1",
    blocks="model.layers",
    norm_groups=(
        NormGroup("input_layernorm", _QKV + ("mamba.in_proj",)),
        NormGroup("pre_ff_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj")),
    ),
    linear_pairs=(_V_O, LinearPair("feed_forward.up_proj", "feed_forward.down_proj")),
    norm_kind="rms",
    final_norm="model.final_layernorm",
    stages=(
        _QKV + ("mamba.in_proj",),
        ("self_attn.o_proj",),
        ("mamba.out_proj",),
        ("feed_forward.gate_proj", "feed_forward.up_proj"),
        ("feed_forward.down_proj",),
    ),
    why_not_rotatable="its Mamba mixer writes to the residual stream beside attention, and QuaRot's rotation "
    "handles attention and MLP writers only",
)

# What stands between a family and the adapter table: said in the refusal, so that a user
# reads the architectural reason, not only "no entry"
NO_ADAPTER_BECAUSE: dict[str, str] = {}


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
