"""What can be checked about a model before any weight loads.

Two questions, asked in a sweep's preflight so that a bad path or a setting the model cannot
honour fails in seconds, naming the key, instead of in every cell after the load:

* are the model's files there (:func:`check_model_files`): a local folder with a readable
  ``config.json`` and a tokenizer, or a Hub id that is well formed and, when the Hub is off,
  in the local cache;
* what the model's config bounds (:func:`model_limits`): its context length (calibration
  windows must fit in it) and the widest input of its linear layers (a weight group wider than
  every row is not a group).  Read from the config alone, on PyTorch's ``meta`` device (no
  memory, no weights), and ``None`` where the config is not known before the load (a GGUF not
  converted yet): the cell then checks after loading (:func:`check_limits` on the loaded config).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qeval.config import ConfigError, ModelSpec, fail
from qeval.offline import offline

#: files of which a model folder needs at least one for AutoTokenizer (fast, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.tiktoken")


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a Hub id (``org/name``: one slash, no leading ``/ . ~``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_folder(path: str, key: str = "model.path") -> None:
    """A folder ``from_pretrained`` can read: it exists, has a parseable ``config.json`` that
    names its architecture, and a tokenizer."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        fail(key, path, "an existing folder holding a model's config.json and tokenizer files")
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError(f"invalid value {key}={path!r}: the folder has no config.json (not a model folder)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"invalid value {key}={path!r}: its config.json is not valid JSON ({err})") from err
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(
            f"invalid value {key}={path!r}: its config.json names no model_type (not a transformers model config)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"invalid value {key}={path!r}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )


def check_model_files(spec: ModelSpec) -> None:
    """ConfigError naming ``model.path`` when the model's files cannot be there (see module doc)."""
    if spec.source == "local":
        check_model_folder(str(spec.path))
    elif spec.source == "hub":
        _check_hub(str(spec.path), spec.revision)


@functools.cache
def _check_hub(name: str, revision: str | None) -> None:
    if Path(name).expanduser().is_dir():  # from_pretrained reads an existing folder first
        check_model_folder(name)
        return
    if _looks_like_path(name):
        fail("model.path", name, "an existing folder, or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ConfigError(f"invalid value model.path={name!r}: not a Hub id ({err})") from err
    if offline() and not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        raise ConfigError(
            f"invalid value model.path={name!r}: downloads are off (HF_HUB_OFFLINE / QEVAL_OFFLINE) and the "
            "Hugging Face cache has no config.json of it: download it first (huggingface-cli download "
            f"{name}) or point model=local model.path at a folder"
        )


@dataclass(frozen=True)
class ModelLimits:
    """The sizes a cell's settings must respect (None: the config does not say)."""

    context: int | None  # max_position_embeddings (None: no fixed context, e.g. a state-space model)
    widest_input: int | None  # the largest input width of the model's linear layers and fused experts


def linear_shapes(config: Any) -> set[tuple[int, int]]:
    """The (out, in) shapes of a config's decoder linear layers (the model built on the meta
    device; the embeddings and head excluded, as quantization excludes them by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return {
        (m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    }


def limits_of(config: Any) -> ModelLimits:
    """The limits of a transformers config: its context, and its linear layers' widest input
    (the model built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text, "max_position_embeddings", None)
    context = context if isinstance(context, int) and not isinstance(context, bool) else None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build here: no width bound
        return ModelLimits(context, None)
    from qeval.quant.experts import find_fused_experts

    widths = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    widths += [p.in_features for experts in find_fused_experts(model) for p in experts.params]
    return ModelLimits(context, max(widths, default=None))


_LIMITS: dict[str, ModelLimits] = {}


def model_limits(spec: ModelSpec, cache_dir: str | None = None) -> ModelLimits | None:
    """The model's limits from its config (once per model and process), or None when the config
    is unknown before the load (a GGUF not converted yet, a Hub model not in the cache)."""
    from qeval.models.loading import peek_config

    key = json.dumps([dataclasses.asdict(spec), cache_dir], sort_keys=True, default=str)
    if key not in _LIMITS:
        config = peek_config(spec, cache_dir)
        if config is None:
            return None
        _LIMITS[key] = limits_of(config)
    return _LIMITS[key]
