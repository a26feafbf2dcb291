"""A model that fills the machine: a random-weight Llama at real layer shapes, sized to about
45 % of this machine's RAM, through one sweep of fp16, w4g128 RTN, kv4 and GPTQ w4g128.

It checks the claim of qeval's memory model: a sweep holds one copy of the weights (each cell
loads its own copy and quantizes it in place; what the quantized cells are compared with is
computed on that copy before quantizing), so its peak resident memory stays within
1.2 x the weight bytes plus a few GB, where keeping an unquantized copy beside each quantized
one needed twice the weights.

1. Builds the model layer by layer straight into safetensors shards (about 1 GB each, so
   neither the build nor the load holds a second copy): Llama-2/3-like blocks (hidden 2560,
   20 heads of 128 with 4 KV heads, MLP 6912, vocabulary 32000), as many blocks as fit the
   budget; random weights (std 0.02) of a fixed seed.  A byte-level tokenizer (ids below
   259) goes with it.
2. Runs ``qeval -m model=local ... quant=fp16,w4g128,kv4 method=rtn`` and then the GPTQ cell
   (small calibration) into the same results folder, polling the resident memory of the
   whole process tree every 0.2 s.
3. Prints per cell: status, times per stage (load, quantize, eval), and the sweep's peak RSS
   against the bound.

    python benchmarks/big_model.py --out /tmp/big-llama            # ~45 % of RAM
    python benchmarks/big_model.py --out /tmp/big-llama --params 0.5e9   # a quick check

Perplexities of a random model mean nothing; the numbers that matter are the memory and the
times.  Say which machine a time came from (they differ by up to 2x between machines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPE_CHOICES = {
    # Llama-2/3-like blocks narrow enough that ~2.7 B parameters make 39 of them (the CPU run)
    "default": dict(
        vocab_size=32000,
        hidden_size=2560,
        intermediate_size=6912,
        num_attention_heads=20,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    # Llama 3 8B's shapes (32 blocks at --params 8.03e9): the GPU run of issue 18
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
}
SHAPES = SHAPE_CHOICES["default"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_BYTES = 1 << 30


def _per_block(h: int, inter: int, heads: int, kv: int, head_dim: int) -> int:
    return h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h


def blocks_for(params: float, shapes: dict = SHAPES) -> int:
    h, inter = shapes["hidden_size"], shapes["intermediate_size"]
    per_block = _per_block(h, inter, shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"])
    outside = 2 * shapes["vocab_size"] * h + h
    return max(1, round((params - outside) / per_block))


def build(out: Path, params: float, seed: int, shape: str = "default", dtype: str = "float32") -> dict:
    """Write config, tokenizer and safetensors shards of a random Llama with ``params``
    parameters (rounded to whole blocks), one tensor at a time: never a second copy."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qeval.models.tiny import byte_tokenizer

    if (out / "config.json").is_file() and (out / "qeval_big_model.json").is_file():
        info = json.loads((out / "qeval_big_model.json").read_text())
        print(f"model folder {out} exists ({info['params'] / 1e9:.2f} B parameters): reusing it")
        return info
    out.mkdir(parents=True, exist_ok=True)
    shapes = SHAPE_CHOICES[shape]
    config = AutoConfig.for_model("llama", num_hidden_layers=blocks_for(params, shapes), **shapes)
    torch_dtype, width = DTYPES[dtype], DTYPES[dtype].itemsize
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []  # the tensor names of each written shard
    size = total = 0
    t0 = time.perf_counter()

    def flush() -> None:
        save_file(shard, str(out / f"shard-{len(files)}.safetensors"), metadata={"format": "pt"})
        files.append(list(shard))
        shard.clear()

    for name, p in skeleton.named_parameters():
        tensor = torch.ones(p.shape) if p.dim() == 1 else torch.empty(p.shape).normal_(0.0, 0.02, generator=gen)
        tensor = tensor.to(torch_dtype)
        if shard and size + tensor.numel() * width > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = tensor
        size += tensor.numel() * width
        total += tensor.numel()
    flush()
    count = len(files)
    weight_map = {}
    for i, names in enumerate(files):  # the names transformers expects: model-00001-of-0000N
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (out / f"shard-{i}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * width}, "weight_map": weight_map}, indent=1)
    )
    config.torch_dtype = config.dtype = dtype
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    info = {
        "params": total,
        "weight_bytes": total * width,
        "blocks": config.num_hidden_layers,
        "seed": seed,
        "shape": shape,
        "dtype": dtype,
    }
    (out / "qeval_big_model.json").write_text(json.dumps(info, indent=1))
    print(
        f"random Llama: {total / 1e9:.2f} B parameters ({total * width / 2**30:.1f} GiB in {dtype}), "
        f"{config.num_hidden_layers} blocks, {count} shards, built in {time.perf_counter() - t0:.0f} s"
    )
    return info


class TreeRSS:
    """Peak resident memory of a process and all its children, polled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(command: list[str]) -> tuple[int, int, float]:
    print(" ".join(command), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=os.environ.copy())
    rss = TreeRSS(proc.pid)
    code = proc.wait()
    return code, rss.stop(), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/big-llama"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--params", type=float, default=None, help="parameters (default: 45 %% of RAM in fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=4, help="GPTQ calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="GPTQ calibration window length")
    parser.add_argument("--shape", choices=sorted(SHAPE_CHOICES), default="default", help="layer shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights on disk and in the cells")
    parser.add_argument("--device", default="cpu", help="backend.device of the cells (cuda: the GPU run)")
    parser.add_argument("--offload", default="auto", help="backend.offload (always: one block at a time on the GPU)")
    args = parser.parse_args()
    import psutil

    ram = psutil.virtual_memory().total
    params = args.params if args.params is not None else 0.45 * ram / DTYPES[args.dtype].itemsize
    info = build(args.out, params, args.seed, args.shape, args.dtype)
    sweep = "big-model"
    common = [
        "qeval",
        "-m",
        "model=local",
        f"model.path={args.out}",
        "model.name=big-llama-random",
        "suite=tiny",
        f"results_dir={args.results}",
        f"sweep_name={sweep}",
        f"model.dtype={args.dtype}",
        f"backend.device={args.device}",
        f"backend.offload={args.offload}",
    ]
    runs = [
        run([*common, "quant=fp16,w4g128,kv4", "method=rtn"]),
        run([*common, "quant=w4g128", "method=gptq", f"calib.nsamples={args.nsamples}", f"calib.seqlen={args.seqlen}"]),
    ]
    peak = max(r[1] for r in runs)
    bound = 1.2 * info["weight_bytes"] + 3 * 2**30
    print(
        f"\nmodel: {info['params'] / 1e9:.2f} B parameters, {info['weight_bytes'] / 2**30:.1f} GiB of weights "
        f"({args.dtype}) on {args.device}"
    )
    print(f"RAM {ram / 2**30:.1f} GiB; CPU: {os.cpu_count()} cores")
    print("\n| cell | status | load s | quantize s | eval s | total s | GPU peak GiB (quantize / all) | weights |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted((args.results / sweep).glob("*.json")):
        if path.name.endswith(".items.json"):
            continue
        rec = json.loads(path.read_text())
        t = rec.get("timings", {})
        cells = [
            t.get("load"),
            t.get("quantize"),
            sum((t.get("eval") or {}).values()) if t.get("eval") else None,
            t.get("total"),
        ]
        shown = " | ".join("" if v is None else f"{v:.0f}" for v in cells)
        mem = rec.get("memory") or {}
        gpu = f"{mem.get('gpu_peak_quantize_gib', '')} / {mem.get('gpu_peak_gib', '')}" if mem else "–"
        where = (rec.get("placement") or {}).get("weights", "")
        print(f"| {rec['label']} | {rec['status']} | {shown} | {gpu} | {where} |")
    for (code, rss, seconds), what in zip(runs, ["fp16, w4g128, kv4 (RTN)", "w4g128 GPTQ"]):
        print(f"sweep {what}: exit {code}, {seconds:.0f} s, peak RSS of the process tree {rss / 2**30:.2f} GiB")
    verdict = "within" if peak <= bound else "ABOVE"
    print(f"peak RSS {peak / 2**30:.2f} GiB: {verdict} the bound 1.2 x weights + 3 GiB = {bound / 2**30:.2f} GiB")
    sys.exit(0 if all(r[0] == 0 for r in runs) and peak <= bound else 1)


if __name__ == "__main__":
    main()
