"""Task plugin folders checked before the first cell.

lm-eval's task index skips a YAML file it cannot parse (a debug log line), and resolves a
task's ``!function`` modules and data files only when the task is built, which in a sweep is
after a model has loaded, been quantized and run the suite's other tasks.  So a typo in a plugin
cost minutes and was reported as "neither a native task nor an lm-eval task", the YAML error
hidden.  Here, in the sweep's preflight (seconds):

* every YAML file of every ``tasks.include`` folder is parsed: a malformed one is an error
  naming the file and line (:func:`check_plugin_folders`);
* every lm-eval task the suite uses whose YAML lives in qeval's or the user's task folders
  (lm-eval's own tasks are its business) has its ``!function`` modules imported and its local
  ``dataset_kwargs.data_files`` found (:func:`check_task_plugin`), groups and tags followed
  to their tasks.
"""

from __future__ import annotations

import functools
import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qeval.config import ConfigError

_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}
_GLOB_CHARS = set("*?[")


def _yaml_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.y*ml")):
        if path.suffix in (".yaml", ".yml") and not _IGNORED_DIRS & set(path.parts):
            yield path


def check_plugin_folders(include: tuple[str, ...]) -> None:
    """ConfigError naming the file and line of the first YAML file in ``include`` that does not
    parse (or is not a mapping, or includes a file that is missing or itself broken)."""
    for folder in include:
        root = Path(folder).expanduser()
        if root.is_dir():  # a missing folder is task_paths' error, with its own message
            for path in _yaml_files(root):
                _check_yaml(str(path.resolve()))


@functools.cache
def _check_yaml(path: str) -> None:
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        load_yaml(path, resolve_func=False)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = " ".join(str(p) for p in (err.context, err.problem) if p)
        raise ConfigError(f"tasks.include: malformed YAML at {where}: {problem}") from err
    except (yaml.YAMLError, OSError, ValueError) as err:
        raise ConfigError(f"tasks.include: cannot read task file {path}: {err}") from err


def _leaf_tasks(name: str, manager: Any, seen: set[str]) -> Iterator[Any]:
    """The index entries of the tasks behind ``name`` (itself, or a group's or tag's members)."""
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return
    kind = getattr(entry.kind, "name", str(entry.kind))
    if kind == "TAG":
        members: list[Any] = sorted(entry.tags)
    elif kind == "GROUP":
        listed = (entry.cfg or {}).get("task") or []
        members = listed if isinstance(listed, list) else [listed]
    else:
        yield entry
        return
    for member in members:
        member_name = member.get("task") if isinstance(member, dict) else member
        if isinstance(member_name, str):
            yield from _leaf_tasks(member_name, manager, seen)


def check_task_plugin(entry_name: str, task: str, manager: Any, roots: list[str]) -> None:
    """ConfigError naming the suite entry when a task (or a member of a group) that lives under
    ``roots`` names a ``!function`` that cannot be imported or a local data file that is missing."""
    resolved = [str(Path(r).resolve()) for r in roots]
    for leaf in _leaf_tasks(task, manager, set()):
        path = getattr(leaf, "yaml_path", None)
        if path is None or not any(str(Path(path).resolve()).startswith(r + "/") for r in resolved):
            continue
        problem = _task_file_problem(str(path))
        if problem:
            raise ConfigError(f"suite.tasks.{entry_name}: task {leaf.name!r} ({path}) {problem}")


@functools.cache
def _task_file_problem(path: str) -> str | None:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=True)
    except (ImportError, AttributeError, FileNotFoundError, ValueError) as err:
        return f"cannot be built: {err}"
    except Exception as err:  # noqa: BLE001 - a plugin module that raises on import
        return f"cannot be built: {type(err).__name__}: {err}"
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    for file in _data_file_names(data_files):
        if "://" in file:
            continue
        found = glob.glob(str(Path(file).expanduser())) if _GLOB_CHARS & set(file) else None
        if found == [] or (found is None and not Path(file).expanduser().exists()):
            return f"reads the data file {file!r}, which does not exist (dataset_kwargs.data_files)"
    return None


def _data_file_names(data_files: Any) -> Iterator[str]:
    if isinstance(data_files, str):
        yield data_files
    elif isinstance(data_files, dict):
        for value in data_files.values():
            yield from _data_file_names(value)
    elif isinstance(data_files, list):
        for value in data_files:
            yield from _data_file_names(value)
