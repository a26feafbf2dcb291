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
import os
import re
import sys
from collections.abc import Iterable
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


@dataclass
class TaskContext:
    """What a native task gets to evaluate one cell.

    ``reference`` is the unquantized model of the same cell (shared, loaded once per
    process; never modify it): tasks that compare with the FP answer use it, and cache
    what they compute from it under ``cache_dir`` so later cells don't recompute it.
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


class NativeTask:
    """Base class of a qeval-native task.

    Subclasses set the class attributes and implement :meth:`evaluate`, which
    returns a flat dict of metrics: each metric with its standard error under
    ``<metric>_stderr`` (where one exists) and the number of scored items under
    ``samples``.  ``params`` come from the suite entry (``suite.tasks.<name>.params``).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    description: ClassVar[str] = ""
    # where the task reads its data: paths under the data directory (offline) and the online source
    data: ClassVar[tuple[str, ...]] = ()
    online: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

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
        from qeval.data import available, missing_message, offline

        missing = [rel for rel in self.data if not available(rel, data_dir)]
        if missing and (offline() or not self.online):
            raise TaskDataError(f"task {self.name!r} cannot run: " + missing_message(missing, data_dir))

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


def task_manager(include: tuple[str, ...] = (), data_dir: str | None = None) -> Any:
    """lm-eval's TaskManager over its own tasks plus qeval's task folders (:func:`task_paths`),
    built once per ``include``, data folder and process (indexing the YAML files takes seconds).

    ``data_dir`` reaches qeval's ``custom_dataset`` loaders as the ``qeval_data_dir`` keyword
    (lm-eval passes a TaskManager's metadata to them), so a cell's data folder is an argument,
    not process state; None lets the loaders use ``$QEVAL_DATA_DIR`` or ``../shared/data``."""
    return _task_manager(tuple(include), str(data_dir) if data_dir else None)


@lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], data_dir: str | None) -> Any:
    """One index per (folders, data folder), however the caller spelled the arguments."""
    # lm_eval.tasks takes seconds to import (datasets, its registry); suites of perplexity or
    # native tasks alone, and the reports, never need it
    from lm_eval.tasks import TaskManager

    metadata = {"qeval_data_dir": str(data_dir)} if data_dir else None
    return TaskManager(include_path=task_paths(include), metadata=metadata)


def lm_eval_task_files(name: str, include: Iterable[str] = (), manager: Any = None) -> list[str]:
    """The table files an lm-eval task plugin reads, from the paths its ``metadata.data`` names
    (globs allowed, e.g. ``mmlu/test/*_test.csv``; the text after ``|`` is the online note)."""
    entry = (manager or task_manager(tuple(include))).task_index.get(name)
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
    return name in task_manager(include, data_dir).all_tasks


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


def list_tasks(include: Iterable[str] = ()) -> list[TaskInfo]:
    """Every qeval task plugin (native and lm-eval YAML) under the task folders."""
    include = tuple(include)
    roots = [Path(p) for p in task_paths(include)]
    infos = [_native_info(cls) for cls in discover_native(include).values()]
    tm = task_manager(include)
    for name, entry in tm.task_index.items():
        yaml_path = entry.yaml_path
        if not yaml_path or not any(Path(yaml_path).resolve().is_relative_to(r) for r in roots):
            continue  # lm-eval's own tasks stay usable by name but are not listed
        info = _lm_eval_info(name, entry)
        if info is not None:
            infos.append(info)
    # a group's members (qeval_mmlu_<subject>, its category groups) are usable by name but
    # listed as one line: the group's, with the count of its members
    groups = sorted((t.name for t in infos if t.kind == "lm_eval group"), key=len)
    members: dict[str, int] = {}
    kept = []
    for t in infos:
        parent = next((g for g in groups if t.name != g and t.name.startswith(g + "_")), None)
        if parent is None:
            kept.append(t)
        elif t.kind == "lm_eval":
            members[parent] = members.get(parent, 0) + 1
    kept = [
        TaskInfo(**{**t.__dict__, "description": f"{members[t.name]} subtasks ({t.name}_*)"})
        if t.name in members
        else t
        for t in kept
    ]
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
    entry = task_manager(include).task_index.get(name)
    if entry is None:
        raise KeyError(name)
    info = _lm_eval_info(name, entry)
    return info or TaskInfo(name, "lm_eval", "unassigned", "acc", True, "lm-eval")
