"""The task registry: every task a suite can name, with what reports need to know about it.

Two kinds of task plugins live side by side in ``tasks/<family>/`` and in any
folder a user adds with ``tasks.include=[/path/to/my_tasks]``:

* **lm-eval YAML tasks** (with optional Python helpers), found by lm-eval's own
  ``TaskManager``.  qeval reads three keys of their ``metadata`` block:
  ``family``, ``primary_metric`` and ``higher_is_better``.
* **qeval-native tasks**: a Python class deriving from :class:`NativeTask`,
  decorated with :func:`register_task`, for what lm-eval has no task for
  (multi-turn dialogue with degeneration metrics, long-context retrieval,
  calibration error).  Every ``*.py`` file under a task folder that mentions
  ``register_task`` is imported once per process.

A plugin declares its family, primary metric and direction, so reports group
and normalise every task the same way, without a list of special cases.

This module owns task *discovery* for both kinds: the task folders
(:func:`task_paths`), lm-eval's ``TaskManager`` over them (:func:`task_manager`),
the native plugins (:func:`discover_native`) and what ``qeval-tasks`` and the
reports know about a task (:func:`list_tasks`, :func:`task_info`).  Running an
lm-eval task is :mod:`qeval.eval.harness`'s job.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from qeval.config import ConfigError
from qeval.data_sources import SOURCES

log = logging.getLogger(__name__)

# the five Qllm-Eval families, in report order; a plugin may declare another
FAMILIES = ("basic_nlp", "emergent", "ethics", "dialogue", "long_context")
BUILTIN_TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"


class TaskDataError(FileNotFoundError):
    """A task needs data that is neither in the data directory nor reachable online."""


class TaskParamError(ConfigError, TypeError):
    """A bad value in a task's ``params`` (or a setting the model cannot satisfy, such as a
    chat template it lacks).

    The one error type native tasks raise for their parameters.  It is a ``ConfigError`` (so
    the message reads like every other bad configuration value and the sweep's preflight
    reports it before a model loads) and a ``TypeError``, which is what Python raises for an
    unknown keyword, so a caller catches bad and unknown parameters alike.
    """


ItemValue = bool | int | float | str | None
ITEM_TEXT_CHARS = 80  # an ``answer`` column's values: the extracted answer, never a whole generation
ITEM_STR_MAX = 256  # the longest string keep_items accepts in any column (ids included)


def short_text(text: str | None, limit: int = ITEM_TEXT_CHARS) -> str | None:
    """``text`` stripped and cut to at most ``limit`` characters (None stays None): what a task
    puts in an ``answer`` column."""
    if text is None:
        return None
    text = str(text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _item_value(column: str, row: int, value: Any) -> ItemValue:
    """One cell of an item table as a plain JSON scalar (NaN becomes None), or a ValueError."""
    if value is None or type(value) is bool or type(value) is str:
        if isinstance(value, str) and len(value) > ITEM_STR_MAX:
            raise ValueError(
                f"keep_items: column {column!r} row {row} is a string of {len(value)} characters "
                f"(at most {ITEM_STR_MAX}: store a short answer, e.g. registry.short_text(text), "
                "never a prompt or a whole generation)"
            )
        return value
    if isinstance(value, int):  # int subclasses (IntEnum, numpy ints are not) become plain ints
        return int(value)
    if isinstance(value, float):  # float subclasses such as numpy.float64
        value = float(value)
        return None if math.isnan(value) else value
    raise ValueError(
        f"keep_items: column {column!r} row {row} holds a {type(value).__name__} ({value!r:.60}); "
        "item values must be bool, int, float, str or None"
    )


class LazyReference:
    """``TaskContext.reference`` for a task that reads the FP model during :meth:`NativeTask.evaluate`
    (a plugin written before :meth:`NativeTask.prepare_reference`): the unquantized model, loaded
    on first use — a second copy in memory, so it says so once.  Built-in tasks prepare their
    references before the cell quantizes its copy and never touch it."""

    def __init__(self, load: Callable[[], Any], task: str) -> None:
        self._load, self._task, self._model = load, task, None

    def _get(self) -> Any:
        if self._model is None:
            log.warning(
                "task %s reads ctx.reference while evaluating: loading a second, unquantized copy of the model "
                "(implement NativeTask.prepare_reference to compute what it needs before quantization instead)",
                self._task,
            )
            self._model = self._load()
        return self._model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)


@dataclass
class TaskContext:
    """What a native task gets to evaluate one cell.

    ``reference`` is the unquantized model of the same cell (never modify it).  In a sweep it is
    a :class:`LazyReference`: a task should compute what it compares with in
    :meth:`NativeTask.prepare_reference` (run on the cell's own copy before quantization) and
    cache it under ``cache_dir``, keyed by ``reference_fingerprint``; reading ``reference``
    while evaluating loads a second copy.

    ``items`` is the task's per-item table, filled by :meth:`keep_items` (None when the task
    keeps none): whoever ran :meth:`NativeTask.evaluate` reads it afterwards.
    """

    model: Any
    tokenizer: Any
    seed: int = 0
    limit: int | None = None
    reference: Any = None
    reference_fingerprint: str = ""
    cache_dir: Path | None = None
    data_dir: str | None = None
    is_reference: bool = False  # the cell's model is the unquantized one itself
    extra: dict[str, Any] = field(default_factory=dict)
    # the backend's scorer of ``model`` (None: a bare model): a task that runs lm-eval through
    # it gets the backend's lm-eval model (shared-context scoring where the spec allows it)
    scorer: Any = None
    items: dict[str, list[ItemValue]] | None = field(default=None, init=False, repr=False)

    def keep_items(self, **columns: Sequence[Any]) -> None:
        """Keep the task's per-item outcomes: equal-length columns, one row per item.

        ``id`` (required) holds unique strings derived from the data (the same item has the same
        id in every cell of a suite); every value is a bool, int, float, str (at most
        ``ITEM_STR_MAX`` characters) or None, and a float NaN is kept as None (undefined for that
        item).  The columns are copied into :attr:`items` (``id`` first); a second call replaces
        the first.  A bad table raises ValueError naming the column; :class:`NativeTask`
        documents which columns a task keeps.
        """
        if "id" not in columns:
            raise ValueError(f"keep_items needs an 'id' column (got {sorted(columns)})")
        table: dict[str, list[ItemValue]] = {}
        for name in ["id", *(c for c in columns if c != "id")]:
            values = columns[name]
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
                raise ValueError(
                    f"keep_items: column {name!r} must be a list of values, one per item, not a {type(values).__name__}"
                )
            table[name] = [_item_value(name, row, v) for row, v in enumerate(values)]
        rows = len(table["id"])
        for name, values in table.items():
            if len(values) != rows:
                raise ValueError(f"keep_items: column {name!r} has {len(values)} values, column 'id' has {rows}")
        seen: set[str] = set()
        for row, item_id in enumerate(table["id"]):
            if not isinstance(item_id, str) or not item_id:
                raise ValueError(f"keep_items: column 'id' row {row} is {item_id!r}: ids are non-empty strings")
            if item_id in seen:
                raise ValueError(f"keep_items: column 'id' repeats {item_id!r} (row {row}): ids must be unique")
            seen.add(item_id)
        self.items = table


class NativeTask:
    """Base class of a qeval-native task.

    Subclasses set the class attributes and implement :meth:`evaluate`, which
    returns a flat dict of metrics: each metric with its standard error under
    ``<metric>_stderr`` (where one exists) and the number of scored items under
    ``samples``.  ``params`` come from the suite entry (``suite.tasks.<name>.params``).

    Per-item outcomes.  ``evaluate`` also keeps one row per scored item with
    :meth:`TaskContext.keep_items`, so a quantized cell can be compared with the
    unquantized one item by item (flips, McNemar's test, paired differences).  The columns:

    * ``id`` (required): a string derived from the data alone, never from model output, so
      the same item has the same id in every cell of a suite (MT-Bench ``"81/t1"``: question
      and turn; needle ``"1000/d25/0"``: length, depth in percent, case; LongEval
      ``"20lines/3"``; self-calibration ``"<subtask>/<doc_id>"``).
    * the column named like :attr:`primary_metric`, where the metric is a mean over items:
      each item's value, whose mean over the rows where it is not None is the reported metric
      (needle and LongEval ``acc``: 0/1 for the cases at the longest tested length ``acc_at``,
      which is what ``acc`` averages, None for the shorter lengths; MT-Bench
      ``degeneration`` per answer).  None means "undefined for this item" or "not part of
      this metric" and is left out, as :func:`qeval.eval.scores.mean_stderr` does.  A metric
      that is not a mean over items (self-calibration's ECE, computed over confidence bins)
      has no such column; the task keeps the per-item values the metric is computed from
      (``correct`` and ``confidence``) and names its paired outcome in :attr:`item_outcome`.
    * ``answer``: the model's extracted or chosen answer, cut to ``ITEM_TEXT_CHARS``
      characters (:func:`short_text`); never a prompt or a whole generation.
    * any other cheap per-item value (``correct``, per-answer metrics, the case's length...).

    :attr:`item_outcome` names the column the paired analysis compares (None: the column named
    like :attr:`primary_metric`; see :meth:`outcome_column`); :attr:`item_binary` says whether
    it is 0/1 (McNemar's test on flips) or continuous (paired differences); None lets
    :meth:`outcome_binary` infer it from the values (binary when every defined value is 0 or 1).
    A task that never calls ``keep_items`` still works: ``ctx.items`` stays None.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    description: ClassVar[str] = ""
    # where the task reads its data: paths under the data directory (offline) and the online source
    data: ClassVar[tuple[str, ...]] = ()
    online: ClassVar[str] = ""
    # the per-item column the paired analysis compares (None: primary_metric) and whether it is 0/1
    item_outcome: ClassVar[str | None] = None
    item_binary: ClassVar[bool | None] = None
    # the outcome's direction when it is not the primary metric (None: higher_is_better)
    item_higher_is_better: ClassVar[bool | None] = None

    def __init__(self, **params: Any) -> None:
        self.params = params

    @classmethod
    def outcome_column(cls) -> str:
        """The column of ``ctx.items`` the paired analysis compares item by item."""
        return cls.item_outcome or cls.primary_metric

    @classmethod
    def outcome_higher_is_better(cls) -> bool:
        """Whether a larger value of the outcome column is better (``correct``: yes, even where
        the primary metric, e.g. ECE, is lower-is-better)."""
        if cls.item_higher_is_better is not None:
            return cls.item_higher_is_better
        return cls.higher_is_better

    @classmethod
    def outcome_binary(cls, items: Mapping[str, Sequence[Any]] | None = None) -> bool:
        """Whether the outcome column is 0/1: :attr:`item_binary` when set, else inferred from
        ``items`` (every value that is not None is 0, 1, False or True; False without items)."""
        if cls.item_binary is not None:
            return cls.item_binary
        values = [v for v in (items or {}).get(cls.outcome_column(), []) if v is not None]
        return bool(values) and all(isinstance(v, (bool, int, float)) and v in (0, 1) for v in values)

    def data_files(self, include: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Every data file this configured task may read: what ``qeval-data fetch`` materialises."""
        return tuple(self.data)

    def check_available(self, data_dir: str | None = None, include: tuple[str, ...] = ()) -> None:
        """Raise :class:`TaskDataError` before any model loads if the data can't be had.

        A file counts as available when it is local, cached, or has a pinned online source
        (:mod:`qeval.data_sources`) and downloads are allowed; nothing is downloaded here.
        ``include`` are the user's extra task folders (for tasks that run other tasks)."""
        # qeval.data imports torch (seconds): the reports read FAMILIES from this module and
        # ``qeval-tasks`` lists tasks, neither needs it
        from qeval.data import available, missing_message
        from qeval.offline import offline

        missing = [rel for rel in self.data if not available(rel, data_dir)]
        if missing and (offline() or not self.online):
            raise TaskDataError(f"task {self.name!r} cannot run: " + missing_message(missing, data_dir))

    def prepare_reference(self, ctx: TaskContext) -> None:
        """Compute and cache, with ``ctx.model`` (the unquantized model, before the cell
        quantizes it), what :meth:`evaluate` will compare with; a task that needs nothing of the
        FP model does nothing (the default).  ``evaluate`` then finds it in ``ctx.cache_dir``
        under ``ctx.reference_fingerprint``, with ``ctx.reference`` None: no second model."""

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError


NATIVE_TASKS: dict[str, type[NativeTask]] = {}


def register_task(cls: type[NativeTask]) -> type[NativeTask]:
    """Class decorator: make a native task available to suites by its ``name``."""
    for attr in ("name", "family", "primary_metric"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"native task {cls.__name__} must set the class attribute {attr!r} (a string)")
    other = NATIVE_TASKS.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"two native tasks named {cls.name!r}: {other.__module__} and {cls.__module__}")
    NATIVE_TASKS[cls.name] = cls
    return cls


def task_paths(include: Iterable[str] = ()) -> list[str]:
    """The repository's ``tasks/`` folder, ``QEVAL_TASKS_PATH`` entries, then ``include``."""
    paths = [str(BUILTIN_TASKS_DIR)] if BUILTIN_TASKS_DIR.is_dir() else []
    env = os.environ.get("QEVAL_TASKS_PATH")
    if env:
        paths += [p for p in env.split(os.pathsep) if p]
    for p in include:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise TaskDataError(f"tasks.include names {p!r}, which is not a folder")
        paths.append(str(path.resolve()))
    return paths


def task_manager(include: tuple[str, ...] = (), data_dir: str | None = None, names: Iterable[str] | None = None) -> Any:
    """lm-eval's TaskManager over its own tasks plus qeval's task folders (:func:`task_paths`),
    built once per ``include``, data folder and process.

    With ``names``: when each of them is defined in qeval's and the user's folders alone (a
    task, or a group whose members all are: :func:`_self_contained`), the index of those
    folders serves them.  It takes milliseconds; lm-eval's own ~15,000 YAML files take about
    6 s to index, in every process that plans or runs a cell, although the built-in suites
    name none of its tasks.  A name the folders do not define (lm-eval's ``hellaswag``, a
    tag) gets the full index, as does a caller that names nothing.

    ``data_dir`` reaches qeval's ``custom_dataset`` loaders as the ``qeval_data_dir`` keyword
    (lm-eval passes a TaskManager's metadata to them), so a cell's data folder is an argument,
    not process state; None lets the loaders use ``$QEVAL_DATA_DIR`` or ``../shared/data``."""
    include, data = tuple(include), str(data_dir) if data_dir else None
    if names is not None:
        wanted = list(names)
        own = _task_manager(include, data, False)
        if wanted and all(_self_contained(own.task_index, name) for name in wanted):
            return own
    return _task_manager(include, data, True)


@lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...], data_dir: str | None, defaults: bool) -> Any:
    """One index per (folders, data folder, with lm-eval's own tasks or not), however the
    caller spelled the arguments."""
    # lm_eval.tasks takes seconds to import (datasets, its registry); suites of perplexity or
    # native tasks alone, and the reports, never need it
    from lm_eval.tasks import TaskManager

    metadata = {"qeval_data_dir": str(data_dir)} if data_dir else None
    return TaskManager(include_path=task_paths(include), include_defaults=defaults, metadata=metadata)


def _self_contained(index: Mapping[str, Any], name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``index`` defines ``name`` without lm-eval's own tasks: a task, or a group whose
    members (by name, or inline configurations) are all defined there.  A tag's members are
    whatever tasks anywhere carry it, so only qeval's own tags (``qeval_*``: MMLU's categories)
    count; lm-eval's tasks carry none of them."""
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if entry is None or name in seen:
        return False
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return True
    if entry.kind == Kind.TAG:
        return name.startswith("qeval_")
    if entry.kind != Kind.GROUP:
        return False
    members = (entry.cfg or {}).get("task") or []
    for member in members if isinstance(members, list) else [members]:
        ref = member.get("task") if isinstance(member, dict) else member
        inline = isinstance(member, dict) and ref not in index and ("dataset_path" in member or "include" in member)
        if not inline and not (isinstance(ref, str) and _self_contained(index, ref, seen | {name})):
            return False
    return True


def lm_eval_task_files(name: str, include: Iterable[str] = (), manager: Any = None) -> list[str]:
    """The table files an lm-eval task plugin reads, from the paths its ``metadata.data`` names
    (globs allowed, e.g. ``mmlu/test/*_test.csv``; the text after ``|`` is the online note)."""
    entry = (manager or task_manager(tuple(include), names=[name])).task_index.get(name)
    if entry is None:
        return []
    meta = (entry.cfg or {}).get("metadata") or {}
    declared = str(meta.get("data", "")).split("|", 1)[0]
    out: list[str] = []
    patterns = []
    for token in re.findall(r"[\w.*{},-]+(?:/[\w.*{},-]+)+", declared):
        m = re.search(r"\{([^}]*)\}", token)  # one brace group: mmlu/{test,dev}/*.csv
        patterns += [token[: m.start()] + alt + token[m.end() :] for alt in m.group(1).split(",")] if m else [token]
    for pattern in patterns:
        for rel in sorted(SOURCES):
            if (rel == pattern or fnmatch.fnmatchcase(rel, pattern)) and rel not in out:
                out.append(rel)
    return out


def task_exists(name: str, include: tuple[str, ...] = (), data_dir: str | None = None) -> bool:
    """Whether lm-eval knows ``name`` (its own tasks, qeval's and the user's folders); asked of the
    same index the cell's evaluation will use (``data_dir``), so it is built once."""
    return name in task_manager(include, data_dir, names=[name]).all_tasks


_PLUGIN_MODULES: dict[Path, ModuleType] = {}


def import_plugin_file(path: str | Path) -> ModuleType:
    """Import a plugin's Python file by path, once per process, the way lm-eval's
    ``!function`` does (task folders are not packages).  Native tasks register
    themselves on import; YAML helpers (``utils.py``) are plain modules."""
    path = Path(path).resolve()
    if path not in _PLUGIN_MODULES:
        module_name = "qeval_task_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _PLUGIN_MODULES[path] = module
    return _PLUGIN_MODULES[path]


_SCANNED: set[Path] = set()


def discover_native(include: Iterable[str] = ()) -> dict[str, type[NativeTask]]:
    """Import the native task modules under every task folder (each file read once)."""
    for root in task_paths(include):
        for path in sorted(Path(root).rglob("*.py")):
            path = path.resolve()
            if path in _SCANNED:
                continue
            _SCANNED.add(path)
            if "register_task" in path.read_text(encoding="utf-8", errors="ignore"):
                import_plugin_file(path)
    return NATIVE_TASKS


@dataclass(frozen=True)
class TaskInfo:
    """One row of ``qeval-tasks``: what a task is and where it reads its data."""

    name: str
    kind: str  # lm_eval | native
    family: str
    primary_metric: str
    higher_is_better: bool
    source: str  # the YAML file or Python module defining it
    data: str = ""
    description: str = ""


@dataclass(frozen=True)
class OnlineTask:
    """One of lm-eval's own tasks that a Qllm-Eval family includes but that has no offline copy
    in the shared data: qeval declares its family and primary metric (so reports place it) and
    where it reads its rows, lists it in ``qeval-tasks`` and refuses it, before any model loads,
    when downloads are off."""

    name: str
    family: str
    primary_metric: str
    hub: str  # the Hub dataset lm-eval's task reads
    description: str
    higher_is_better: bool = True

    def info(self) -> TaskInfo:
        return TaskInfo(
            name=self.name,
            kind="lm_eval online",
            family=self.family,
            primary_metric=self.primary_metric,
            higher_is_better=self.higher_is_better,
            source="lm-eval",
            data=f"online only: hf://datasets/{self.hub}",
            description=self.description,
        )


# the study's basic-NLP tasks with no offline copy: used by lm-eval's own names when the Hub is reachable
ONLINE_TASKS: dict[str, OnlineTask] = {
    t.name: t
    for t in (
        OnlineTask("social_iqa", "basic_nlp", "acc", "lighteval/siqa", "SIQA (social commonsense), Qllm-Eval's SIQA"),
        OnlineTask("race", "basic_nlp", "acc", "EleutherAI/race", "RACE-high reading comprehension"),
        OnlineTask("hellaswag", "basic_nlp", "acc_norm", "Rowan/hellaswag", "HellaSwag sentence completion (acc_norm)"),
    )
}


def _native_info(cls: type[NativeTask]) -> TaskInfo:
    return TaskInfo(
        name=cls.name,
        kind="native",
        family=cls.family,
        primary_metric=cls.primary_metric,
        higher_is_better=cls.higher_is_better,
        source=sys.modules[cls.__module__].__file__ or "",
        data=", ".join(cls.data) + (f" | online: {cls.online}" if cls.online else ""),
        description=cls.description,
    )


def _lm_eval_info(name: str, entry: Any) -> TaskInfo | None:
    """TaskInfo of an lm-eval index entry (a task or a group; tags are not tasks)."""
    kind = getattr(entry.kind, "name", str(entry.kind)).lower()
    if kind not in ("task", "group", "py_task"):
        return None
    meta = (entry.cfg or {}).get("metadata") or {}
    return TaskInfo(
        name=name,
        kind="lm_eval" if kind != "group" else "lm_eval group",
        family=str(meta.get("family", "unassigned")),
        primary_metric=str(meta.get("primary_metric", "acc")),
        higher_is_better=bool(meta.get("higher_is_better", True)),
        source=str(entry.yaml_path or ""),
        data=str(meta.get("data", "")),
        description=str(meta.get("description", "")),
    )


LISTED_MEMBERS = 8  # a group of more subtasks than this is listed as one line


def list_tasks(include: Iterable[str] = ()) -> list[TaskInfo]:
    """Every qeval task plugin (native and lm-eval YAML) under the task folders."""
    include = tuple(include)
    roots = [Path(p) for p in task_paths(include)]
    infos = [_native_info(cls) for cls in discover_native(include).values()]
    tm = _task_manager(include, None, False)  # qeval's and the user's folders: all it lists
    for name, entry in tm.task_index.items():
        yaml_path = entry.yaml_path
        if not yaml_path or not any(Path(yaml_path).resolve().is_relative_to(r) for r in roots):
            continue  # lm-eval's own tasks stay usable by name but are not listed
        info = _lm_eval_info(name, entry)
        if info is not None:
            infos.append(info)
    # a large group's members (qeval_mmlu_<subject>, its category groups) are usable by name
    # but listed as one line: the group's, with the count of its members; a small group's
    # members (the five ETHICS subsets) keep their own lines and the group names them
    groups = sorted((t.name for t in infos if t.kind == "lm_eval group"), key=len)
    parents = {t.name: next((g for g in groups if t.name != g and t.name.startswith(g + "_")), None) for t in infos}
    members: dict[str, list[str]] = {}
    for t in infos:
        parent = parents[t.name]
        if parent is not None and t.kind == "lm_eval":
            members.setdefault(parent, []).append(t.name)
    collapsed = {g for g, names in members.items() if len(names) > LISTED_MEMBERS}
    kept = []
    for t in infos:
        if parents[t.name] in collapsed:
            continue
        if t.name in members:
            names = sorted(members[t.name])
            what = f"({t.name}_*)" if t.name in collapsed else "(" + ", ".join(names) + ")"
            t = TaskInfo(**{**t.__dict__, "description": f"{len(names)} subtasks {what}"})
        kept.append(t)
    kept += [o.info() for o in ONLINE_TASKS.values()]
    order = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(kept, key=lambda t: (order.get(t.family, len(order)), t.family, t.name))


def task_info(name: str, include: Iterable[str] = ()) -> TaskInfo:
    """Family, primary metric and direction of one task, native or lm-eval.

    lm-eval's built-in tasks (used by name, online) have no qeval metadata: they are
    reported under family ``unassigned`` with lm-eval's first metric.
    """
    include = tuple(include)
    native = discover_native(include)
    if name in native:
        return _native_info(native[name])
    if name in ONLINE_TASKS:
        return ONLINE_TASKS[name].info()
    entry = task_manager(include, names=[name]).task_index.get(name)
    if entry is None:
        raise KeyError(name)
    info = _lm_eval_info(name, entry)
    return info or TaskInfo(name, "lm_eval", "unassigned", "acc", True, "lm-eval")
