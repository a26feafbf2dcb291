"""The Hydra boundary: a composed config becomes one typed, validated :class:`Cell`.

Everything below ``qeval.runner`` reads a ``Cell`` (frozen dataclasses) and never a
``DictConfig``.  The same dataclasses are Hydra's schemas (:func:`register_configs`),
so a typo'd key fails at composition, and every default lives in one place: the
model, quantization and suite presets under ``qeval/conf/``, each recipe step's
``Params`` and each backend's ``Settings`` (registered from their own modules, no
YAML needed).  :func:`build_cell` converts once and checks every value that needs
no model, naming the key and the allowed values; :func:`preflight` adds what needs
the file system (data, task plugins, an installed backend).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from qeval.backends import BACKENDS, Backend, BackendSettings, backend_for
from qeval.config import (
    MODEL_DTYPES,
    MODEL_SOURCES,
    TASK_KINDS,
    CalibSpec,
    ConfigError,
    MethodPlugins,
    ModelSpec,
    QuantSpec,
    SuiteSpec,
    TaskEntry,
    TaskPlugins,
    check_choice,
    check_seed,
    check_sweep_name,
    fail,
    quantized,
    validate_quant,
)
from qeval.data import TEXT_DATASETS, check_available
from qeval.eval.reasoning import THINKING_SETTINGS
from qeval.eval.registry import import_plugin_file
from qeval.eval.suite import check_suite, suite_kinds
from qeval.models.checks import ModelLimits, check_model_files, model_limits
from qeval.models.tiny import ALL_TINY_FAMILIES
from qeval.placement import resolve_device, resolve_dtype
from qeval.quant.methods import ALIASES, METHODS
from qeval.quant.recipe import Recipe
from qeval.results import stable_hash

# QuantSpec keys added after result folders existed, with the default that reproduces the old
# behaviour: a cell at the default keeps the hash it always had
QUANT_KEYS_ADDED_LATER: dict[str, Any] = {"quantize_router": False}
# suite entry keys added after cells were recorded, dropped from the identity at their default
TASK_KEYS_ADDED_LATER: dict[str, Any] = {"max_gen_toks": None, "thinking": "default"}


def _without_defaults(fields: dict[str, Any], added_later: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without the keys added after cells were recorded that hold their default, so
    the identity (hence the hash) of a cell written before those keys existed still matches."""
    return {k: v for k, v in fields.items() if not (k in added_later and v == added_later[k])}


@dataclass(frozen=True)
class Cell:
    """One sweep cell: model x quantization spec x recipe x suite x backend (and where results go)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    # the recipe as Hydra composes it: {step name: step params}, in order (method=[smoothquant,gptq])
    method: dict[str, Any] = field(default_factory=dict)
    suite: SuiteSpec = field(default_factory=SuiteSpec)
    # the chosen backend's Settings (backend=hf | vllm | a registered one; the defaults list picks one)
    backend: Any = field(default_factory=dict)
    calib: CalibSpec = field(default_factory=CalibSpec)
    tasks: TaskPlugins = field(default_factory=TaskPlugins)
    methods: MethodPlugins = field(default_factory=MethodPlugins)
    sweep_name: str = "default"
    results_dir: str = "results"
    data_dir: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    rerun: bool = False
    # keep each weight-quantized model in <cache_dir>/quantized (safetensors), keyed by model
    # weights + spec + method + calibration + seed, so re-runs with new tasks skip the method
    quantized_cache: bool = False
    # the memory the sweep may use, in GiB (None: the RAM available when it starts); the sweep
    # refuses to start when a cell's expected peak exceeds it (qeval.memory).  Not an identity key
    memory_limit_gib: float | None = None

    @functools.cached_property
    def recipe(self) -> Recipe:
        return Recipe.from_mapping(self.method)

    @functools.cached_property
    def runtime(self) -> Backend:
        """The backend object for this cell's settings."""
        return backend_for(self.backend)

    @property
    def include(self) -> tuple[str, ...]:
        """Extra task-plugin folders."""
        return tuple(self.tasks.include)

    @property
    def label(self) -> str:
        return f"{self.model.name}__{self.quant.name}__{self.recipe.name}"

    @property
    def uses_calibration(self) -> bool:
        """Whether quantizing this cell reads calibration data (a step, or static activation scales)."""
        static_acts = quantized(self.quant.a) and not self.quant.a.dynamic
        return self.recipe.needs_calibration or static_acts

    @property
    def reads_calibration(self) -> bool:
        """Quantizing or opening the cell reads calibration data (then it is part of the identity)."""
        return self.uses_calibration or self.runtime.needs_calibration(self.quant)

    def identity(self) -> dict[str, Any]:
        """The parts of the cell that determine its numbers; their hash names the result file.

        The form is the one records always had (``{model, quant, method: {name, params},
        suite, backend, seed}`` plus ``calib`` when read), so old result folders still match.
        """
        quant = _without_defaults(dataclasses.asdict(self.quant), QUANT_KEYS_ADDED_LATER)
        suite = dataclasses.asdict(self.suite)
        suite["tasks"] = {n: _without_defaults(e, TASK_KEYS_ADDED_LATER) for n, e in suite["tasks"].items()}
        identity: dict[str, Any] = {
            "model": dataclasses.asdict(self.model),
            "quant": quant,
            "method": self.recipe.identity(),
            "suite": suite,
            "backend": self.runtime.cell_identity(self.quant),
            "seed": self.seed,
        }
        if self.quant.tensor_type == "FP":
            # no method touches an unquantized model: quant=fp16 x method=rtn,gptq,awq is one
            # baseline cell, computed once per sweep and found by every method's normalization
            identity["method"] = None
            return identity
        if self.reads_calibration:
            identity["calib"] = dataclasses.asdict(self.calib)
        return identity

    @property
    def hash(self) -> str:
        """The stable hash of :meth:`identity`: the result file's name."""
        return stable_hash(self.identity())

    def to_dict(self) -> dict[str, Any]:
        """The resolved cell as plain data, for the record (``config``)."""
        return dataclasses.asdict(self)


# --- Hydra schemas -----------------------------------------------------------------------


@functools.cache
def hydra_schema(cls: type) -> type:
    """The mutable twin of a frozen dataclass, generated, that Hydra composes into.

    OmegaConf makes every node of a frozen dataclass read-only, dictionary values created
    during a merge included (``suite.tasks.<entry>``), so Hydra could not apply overrides.
    The twin has the same fields, types and defaults (nothing is written twice); the
    composed config is converted back into the frozen classes by :func:`from_plain`.
    """
    hints = typing.get_type_hints(cls)
    twin_fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        tp = _schema_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            twin_fields.append((f.name, tp, field(default=f.default)))
        elif f.default_factory is not dataclasses.MISSING:
            factory = f.default_factory
            if dataclasses.is_dataclass(factory):
                factory = hydra_schema(factory)
            twin_fields.append((f.name, tp, field(default_factory=factory)))
        else:
            twin_fields.append((f.name, tp, field()))
    return _module_level(dataclasses.make_dataclass(_twin_name(cls), twin_fields))


# Hydra's parallel launchers (joblib, submitit, Ray) pickle the ConfigStore into their workers,
# and pickle finds a class by module and name: each generated class is named after its
# original and is resolved again, in any process, by this module's __getattr__.
_TWIN_PREFIX = "HydraSchema__"
_ALIAS_PREFIX = "HydraAlias__"


def _twin_name(cls: type) -> str:
    return f"{_TWIN_PREFIX}{cls.__module__.replace('.', '__')}___{cls.__qualname__.replace('.', '__')}"


def _module_level(cls: type) -> type:
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return cls


@functools.cache
def alias_schema(alias: str) -> type:
    """The schema of ``method=<alias>``: one field per step of the recipe it names."""
    steps = [(n, hydra_schema(METHODS[n].Params)) for n in ALIASES[alias]]
    fields_ = [(n, t, field(default_factory=t)) for n, t in steps]
    return _module_level(dataclasses.make_dataclass(f"{_ALIAS_PREFIX}{alias}", fields_))


def __getattr__(name: str) -> Any:
    """Generated schema classes by name (for unpickling in launcher workers)."""
    if name.startswith(_TWIN_PREFIX):
        module, _, qualname = name[len(_TWIN_PREFIX) :].partition("___")
        target: Any = importlib.import_module(module.replace("__", "."))
        for part in qualname.split("__"):
            target = getattr(target, part)
        return hydra_schema(target)
    if name.startswith(_ALIAS_PREFIX):
        return alias_schema(name[len(_ALIAS_PREFIX) :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _schema_type(tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return hydra_schema(tp)  # type: ignore[arg-type]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and len(args) == 2:
        return dict[args[0], _schema_type(args[1])]  # type: ignore[misc,valid-type]
    if origin is list and len(args) == 1:
        return list[_schema_type(args[0])]  # type: ignore[misc]
    if origin in (typing.Union, types.UnionType):
        members = [_schema_type(a) for a in args if a is not type(None)]
        return members[0] | None if len(members) == 1 and type(None) in args else tp
    return tp


def from_plain(cls: type, data: Any, key: str) -> Any:
    """A frozen dataclass instance from resolved plain data; unknown keys name themselves."""
    if not isinstance(data, dict):
        fail(key, data, f"a mapping of {cls.__name__} fields")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        fail(
            f"{key}.{unknown[0]}" if key else unknown[0],
            data[unknown[0]],
            f"keys of {cls.__name__}: {', '.join(sorted(names))}",
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _from_plain_value(hints[name], value, f"{key}.{name}" if key else name) for name, value in data.items()
    }
    return cls(**kwargs)


def _from_plain_value(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_plain(tp, value, key)  # type: ignore[arg-type]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]) and isinstance(value, dict):
        # cast: is_dataclass also admits instances; a type hint's argument is the class
        return {k: from_plain(typing.cast(type, args[1]), v, f"{key}.{k}") for k, v in value.items()}
    return value


def register_configs() -> None:
    """Register the schemas, every recipe step's parameters and every backend's settings,
    so that ``method=<step>`` / ``backend=<name>`` select typed nodes (call again after
    importing method plugins)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="qeval_schema", node=hydra_schema(Cell))
    cs.store(group="model", name="model_schema", node=hydra_schema(ModelSpec))
    cs.store(group="quant", name="quant_schema", node=hydra_schema(QuantSpec))
    cs.store(group="suite", name="suite_schema", node=hydra_schema(SuiteSpec))
    cs.store(group="calib", name="calib_schema", node=hydra_schema(CalibSpec))
    for name, step in METHODS.items():
        cs.store(group="method", name=name, node=hydra_schema(step.Params), package=f"method.{name}")
    for alias in ALIASES:
        cs.store(group="method", name=alias, node=alias_schema(alias), package="method")
    for name, backend in BACKENDS.items():
        settings: type = backend.Settings  # as type[BackendSettings], mypy finds the instances' __hash__
        cs.store(group="backend", name=name, node=hydra_schema(settings), package="backend")


def load_method_plugins(paths: list[str] | tuple[str, ...]) -> None:
    """Import method plugins (Python files or module names) so their steps register."""
    for entry in paths:
        path = Path(entry).expanduser()
        if path.suffix == ".py":
            if not path.is_file():
                raise ConfigError(f"invalid value methods.include={entry!r}: no such file")
            import_plugin_file(path)  # once per process, keyed by the resolved path
        else:
            try:
                importlib.import_module(entry)
            except ImportError as err:
                raise ConfigError(f"invalid value methods.include={entry!r}: {err}") from err


# --- the boundary --------------------------------------------------------------------------


def _merge_added_tasks(cfg: DictConfig) -> None:
    """Move the entries of ``tasks.add`` into the suite, typed as TaskEntry (defaults filled in,
    unknown keys refused with the entry's name), and drop entries removed with ``~``/null."""
    schema = OmegaConf.structured(TaskEntry)
    added = cfg.tasks.add if "tasks" in cfg and cfg.tasks.add else {}
    for name, entry in added.items():
        if not isinstance(entry, DictConfig):
            fail(f"tasks.add.{name}", entry, "a mapping such as {task: qeval_arc_easy, limit: 100}")
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


def build_cell(cfg: DictConfig | Cell) -> Cell:
    """The typed cell of a composed config, validated (ConfigError naming the key otherwise)."""
    if isinstance(cfg, Cell):
        validate(cfg)
        return resolve_auto(cfg)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    _merge_added_tasks(cfg)
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {getattr(err, 'msg', err)}") from err
    assert isinstance(data, dict)
    backend = data.get("backend") or {}
    name = backend.get("name") if isinstance(backend, dict) else None
    if name not in BACKENDS:
        fail("backend.name", name, "one of " + ", ".join(sorted(BACKENDS)))
    data["backend"] = from_plain(BACKENDS[name].Settings, backend, "backend")
    cell = from_plain(Cell, data, "")
    validate(cell)
    return resolve_auto(cell)


def resolve_auto(cell: Cell) -> Cell:
    """``backend.device=auto`` and ``model.dtype=auto`` made concrete for the machine that builds
    the cell (a GPU if one is visible; float32 on the CPU, bfloat16 on a GPU), so that a cell's
    identity names what really ran: the same hashes as ever on the CPU."""
    device = cell.backend.device
    if device == "auto":
        device = resolve_device("auto").type
    dtype = resolve_dtype(cell.model.dtype, torch.device(device))
    if device == cell.backend.device and dtype == cell.model.dtype:
        return cell
    return dataclasses.replace(
        cell,
        backend=dataclasses.replace(cell.backend, device=device),
        model=dataclasses.replace(cell.model, dtype=dtype),
    )


def validate(cell: Cell) -> None:
    """Every check that needs neither a model nor the file system."""
    m = cell.model
    check_choice("model.source", m.source, MODEL_SOURCES)
    check_choice("model.dtype", m.dtype, MODEL_DTYPES)
    if m.source in ("hub", "local") and not m.path:
        fail("model.path", m.path, f"a Hub id or folder when model.source={m.source}")
    if m.source == "tiny":
        check_choice("model.family", m.family, tuple(ALL_TINY_FAMILIES))
    if m.source == "gguf" and not m.gguf.parts:
        fail("model.gguf.parts", list(m.gguf.parts), "a list of 'distribution:path' pieces")
    validate_quant(cell.quant)
    if not cell.method:
        fail("method", "[]", "a method or a list of them (method=rtn, method=[smoothquant,gptq])")
    cell.recipe  # noqa: B018 - builds the recipe: unknown steps, parameters and orders fail here
    if not isinstance(cell.backend, BackendSettings):
        fail("backend", cell.backend, "one of " + ", ".join(sorted(BACKENDS)))
    cell.runtime.validate()
    if cell.memory_limit_gib is not None and not cell.memory_limit_gib > 0:
        fail("memory_limit_gib", cell.memory_limit_gib, "a positive number of GiB or null (the RAM available)")
    if not cell.suite.tasks:
        fail("suite.tasks", dict(cell.suite.tasks), "at least one task")
    for name, task in cell.suite.tasks.items():
        check_choice(f"suite.tasks.{name}.kind", task.kind, TASK_KINDS)
        if task.kind == "perplexity":
            if task.dataset not in TEXT_DATASETS and not (task.dataset and Path(task.dataset).expanduser().is_file()):
                fail(
                    f"suite.tasks.{name}.dataset",
                    task.dataset,
                    f"one of {', '.join(sorted(TEXT_DATASETS))} or the path of a text file",
                )
            if task.seqlen <= 1:
                fail(f"suite.tasks.{name}.seqlen", task.seqlen, "an integer > 1")
            if task.max_windows is not None and task.max_windows <= 0:
                fail(f"suite.tasks.{name}.max_windows", task.max_windows, "a positive integer or null")
        elif not task.task:
            fail(f"suite.tasks.{name}.task", task.task, "a task name (see qeval-tasks)")
        if task.num_fewshot is not None and task.num_fewshot < 0:
            fail(f"suite.tasks.{name}.num_fewshot", task.num_fewshot, "an integer >= 0 or null")
        if task.limit is not None and task.limit <= 0:
            fail(f"suite.tasks.{name}.limit", task.limit, "a positive integer or null")
        batch = task.batch_size
        if batch != "auto" and not (isinstance(batch, int) and not isinstance(batch, bool) and batch > 0):
            fail(f"suite.tasks.{name}.batch_size", batch, "a positive integer or auto")
        if task.max_gen_toks is not None and task.max_gen_toks <= 0:
            fail(f"suite.tasks.{name}.max_gen_toks", task.max_gen_toks, "a positive integer (tokens) or null")
        check_choice(f"suite.tasks.{name}.thinking", task.thinking, THINKING_SETTINGS)
        if task.thinking != "default" and not task.apply_chat_template:
            fail(
                f"suite.tasks.{name}.thinking",
                task.thinking,
                "default unless apply_chat_template is true (thinking is a chat-template switch)",
            )
    if cell.calib.nsamples <= 0:
        fail("calib.nsamples", cell.calib.nsamples, "a positive integer")
    if cell.calib.seqlen <= 0:  # the model's context bounds it from above (preflight)
        fail("calib.seqlen", cell.calib.seqlen, "a positive integer (tokens per calibration window)")
    for key, value in (("seed", cell.seed), ("calib.seed", cell.calib.seed), ("model.seed", m.seed)):
        check_seed(key, value)
    check_sweep_name(cell.sweep_name)
    if not str(cell.results_dir).strip():
        fail("results_dir", cell.results_dir, "a folder path")


def check_model_limits(cell: Cell, limits: ModelLimits) -> None:
    """The settings the model's config bounds (qeval.models.checks): calibration windows within
    its context, and a weight group no wider than its widest linear input (a
    wider group is one group per row: per-channel quantization under a group label)."""
    name = cell.model.name
    if limits.context is not None:
        if cell.reads_calibration and cell.calib.seqlen > limits.context:
            fail(
                "calib.seqlen",
                cell.calib.seqlen,
                f"1..{limits.context}, the context of {name} (max_position_embeddings)",
            )
    w = cell.quant.w
    if quantized(w) and w.granularity == "group" and limits.widest_input and w.group_size > limits.widest_input:
        fail(
            "quant.w.group_size",
            w.group_size,
            f"at most {limits.widest_input}, the widest linear input of {name}: a wider group is one group "
            "per row (use quant.w.granularity=channel for that)",
        )


def preflight(cell: Cell | DictConfig, here: bool = True) -> Cell:
    """The checks that read the file system but need no model: task names and plugins, data,
    whether the backend is installed and can score every entry, and, when the cell runs on this
    machine (``here``; not when a cluster launcher sends it elsewhere), whether the machine has
    its device.  Returns the (built) cell."""
    if not isinstance(cell, Cell):  # a Cell comes from build_cell, validated already
        cell = build_cell(cell)
    if here:
        resolve_device(cell.backend.device)
    check_model_files(cell.model)
    if (limits := model_limits(cell.model, cell.cache_dir)) is not None:  # else checked after the load
        check_model_limits(cell, limits)
    check_suite(cell.suite, cell.include, cell.data_dir)
    cell.runtime.preflight(suite_kinds(cell.suite, cell.include), cell.suite.name)
    if cell.reads_calibration:
        check_available(cell.calib.dataset, cell.data_dir)
    return cell
