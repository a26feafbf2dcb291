"""Cell claims: which live process is computing a cell.

Two launches into one sweep folder (the same command started twice, or two users sharing a
results folder), or two workers of a parallel launch meeting the shared FP baseline, must not
compute one cell twice and overwrite each other's record.  Before computing a cell, a process
claims it: ``<sweep>/.claims/<hash>.json`` holds the owner's host, pid and start time, and the
owner touches it every :data:`HEARTBEAT_S` seconds while it works.  Claims are taken and broken
under a file lock (``filelock``, as the GGUF conversion does), so two processes never both win.

A claim is *live* while its owner is: on the same host, while its pid exists and its heartbeat
is fresh; from another host (whose pids cannot be asked), while its heartbeat is fresher than
:data:`STALE_S`.  A claim whose owner was killed (``kill -9``, a lost node) is broken by the next
process that wants the cell, so nothing waits on the dead.  A process that meets a live claim
leaves the cell to its owner and goes on with the sweep's other cells
(:func:`qeval.runner.run_cell` returns a ``claimed`` record, written nowhere); the end of its
sweep waits for those cells' results (:func:`live_claims`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qeval.files import atomic_file

HEARTBEAT_S = 30.0  # how often an owner touches its claim
STALE_S = 300.0  # a claim untouched this long has no live owner (10 missed heartbeats)
CLAIMS_DIR = ".claims"


def _claims_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / CLAIMS_DIR


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def owner_alive(owner: dict[str, Any], mtime: float, now: float | None = None) -> bool:
    """Whether the process that wrote a claim (its content, and the claim file's mtime: the last
    heartbeat) is still computing the cell."""
    now = time.time() if now is None else now
    if now - mtime > STALE_S:
        return False
    if owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        return isinstance(pid, int) and _pid_alive(pid)
    return True


def _read(path: Path) -> tuple[dict[str, Any], float] | None:
    try:
        mtime = path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (data, mtime) if isinstance(data, dict) else ({}, mtime)


@dataclass
class Claim:
    """A cell this process holds; release it once the cell's record is written (or on failure)."""

    path: Path
    owner: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=beat, name=f"qeval-claim-{self.path.stem}", daemon=True).start()

    def release(self) -> None:
        """Drop the claim if it is still this process's (a broken and retaken claim is not)."""
        self._stop.set()
        found = _read(self.path)
        if found is not None and found[0].get("token") == self.owner["token"]:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # a folder turned read-only: the claim dies with this process (pid gone)
                pass


def take(sweep_dir: Path, cell_hash: str, label: str) -> Claim | dict[str, Any]:
    """Claim a cell: a :class:`Claim` this process holds, or the live owner's description (host,
    pid, since) when another process holds it.  A dead owner's claim is broken and taken."""
    from filelock import FileLock

    folder = _claims_dir(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cell_hash}.json"
    with FileLock(str(folder / ".lock")):
        found = _read(path)
        if found is not None and owner_alive(*found):
            return found[0]
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "label": label,
            "token": f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}",
        }
        with atomic_file(path, ".json") as f:
            f.write(json.dumps(owner).encode())
    claim = Claim(path, owner)
    claim.start_heartbeat()
    return claim


def live_claims(sweep_dir: Path, hashes: set[str]) -> dict[str, dict[str, Any]]:
    """The cells among ``hashes`` that another live process holds now, with their owners."""
    out = {}
    for cell_hash in hashes:
        found = _read(_claims_dir(sweep_dir) / f"{cell_hash}.json")
        mine = found is not None and found[0].get("host") == socket.gethostname() and found[0].get("pid") == os.getpid()
        if found is not None and owner_alive(*found) and not mine:
            out[cell_hash] = found[0]
    return out


def describe(owner: dict[str, Any]) -> str:
    """``pid 123 on host, since 12:00:01``: who holds a claim, for the log."""
    since = time.strftime("%H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {since}"
