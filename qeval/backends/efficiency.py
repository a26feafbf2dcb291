"""Real-kernel efficiency: prefill and decode latency, throughput and memory on vLLM.

Kernel speed does not depend on weight values, so a checkpoint for timing can
come from a real model quantized by qeval or from a randomly initialized model
at a real size (``random_checkpoint``), which lets a GPU user measure the
speedup of W8A8 or W4A16 on a Llama-2-7B shape without downloading weights.

Definitions (one batch of ``batch`` prompts of ``input_len`` random tokens):

* prefill latency: time to the first generated token (``max_tokens=1``), with prefix
  caching off so that repeated prompts are computed again;
* end-to-end latency: time to ``1 + output_len`` tokens, EOS ignored;
* decode latency per token: (end-to-end - prefill) / output_len;
* throughput: generated tokens per second of end-to-end time;
* weight memory: bytes of the checkpoint's tensors (packed codes and scales
  included); KV-cache bytes per token from the model shape and cache dtype.

Each timing is the median of ``repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

KV_DTYPE_BYTES = {"auto": None, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}

# shapes for random-weight timing (no download): the published configs of these models
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
}


@dataclass
class Timing:
    batch: int
    input_len: int
    output_len: int
    prefill_s: float
    decode_s_per_token: float
    e2e_s: float
    throughput_tok_s: float


def checkpoint_weight_bytes(checkpoint: str | Path) -> int:
    """Bytes of every tensor in the checkpoint's safetensors files."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * _dtype_size(t.get_dtype())
    return total


def _dtype_size(name: str) -> int:
    return {
        "F64": 8,
        "F32": 4,
        "I64": 8,
        "I32": 4,
        "BF16": 2,
        "F16": 2,
        "I16": 2,
        "I8": 1,
        "U8": 1,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
        "BOOL": 1,
    }.get(name, 4)


def kv_bytes_per_token(config: dict[str, Any], kv_cache_dtype: str, model_dtype: str) -> int:
    """Keys and values of one token across all layers."""
    cfg = config.get("text_config", config)
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elem = KV_DTYPE_BYTES.get(kv_cache_dtype) or DTYPE_BYTES.get(model_dtype, 2)
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * elem


def _timed(llm: Any, prompts: list[Any], params: Any) -> float:
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0


def measure(
    llm: Any, batch: int, input_len: int, output_len: int, repeats: int = 3, vocab_size: int = 32000, seed: int = 0
) -> Timing:
    """Time prefill and generation for one (batch, input length) point."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(seed)
    prompts = [
        TokensPrompt(prompt_token_ids=torch.randint(10, vocab_size - 10, (input_len,), generator=g).tolist())
        for _ in range(batch)
    ]
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    full = SamplingParams(max_tokens=1 + output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    _timed(llm, prompts, full)  # warm-up (also fills any kernel caches)
    prefill = statistics.median(_timed(llm, prompts, first) for _ in range(repeats))
    e2e = statistics.median(_timed(llm, prompts, full) for _ in range(repeats))
    decode = max(e2e - prefill, 0.0) / output_len
    return Timing(batch, input_len, output_len, prefill, decode, e2e, batch * (1 + output_len) / e2e)


def random_checkpoint(name_or_config: str, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A randomly initialized model of a real shape, saved as an HF folder (no tokenizer:
    timing feeds token ids).  ``name_or_config``: a key of RANDOM_CONFIGS or a config.json path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    if name_or_config in RANDOM_CONFIGS:
        spec = dict(RANDOM_CONFIGS[name_or_config])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    elif Path(name_or_config).is_file():
        config = AutoConfig.from_pretrained(Path(name_or_config).parent)
    else:
        raise ValueError(
            f"unknown random model {name_or_config!r}: one of {', '.join(RANDOM_CONFIGS)} or the path of a config.json"
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    return out_dir


def timings_record(
    label: str,
    checkpoint: str | Path,
    engine_kwargs: dict[str, Any],
    device: str,
    timings: list[Timing],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """A result-store record (kind ``efficiency``) for one checkpoint's grid."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    dtype = str(engine_kwargs.get("dtype", "auto"))
    from qeval.results import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "efficiency",
        "label": label,
        "status": "ok",
        "device": device,
        "engine": engine_kwargs,
        "checkpoint": str(checkpoint),
        "weight_bytes": checkpoint_weight_bytes(checkpoint),
        "kv_bytes_per_token": kv_bytes_per_token(config, str(engine_kwargs.get("kv_cache_dtype", "auto")), dtype),
        "timings": [asdict(t) for t in timings],
        **extra,
    }
