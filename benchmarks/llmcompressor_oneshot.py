"""Quantize a model with llm-compressor's oneshot and score it the way qeval does.

Runs inside the separate llm-compressor virtual environment that ``benchmarks/methods.py
--llmcompressor`` creates (llm-compressor pins compressed-tensors and transformers versions that
cannot share qeval's environment).  It uses qeval's own calibration sampler and perplexity
protocol, so the only difference to a qeval cell is the quantization algorithm:

    <venv>/bin/python benchmarks/llmcompressor_oneshot.py --model-dir ~/.cache/qeval/models/smollm2-135m \\
        --recipe gptq_w4 --group-size 64 --nsamples 16 --seqlen 512 --windows 4

It prints one JSON line (``RESULT {...}``) with the recipe, perplexity and oneshot wall time.
The model is evaluated in memory right after ``oneshot``: compressed-tensors then quantizes the
weights (and, for W8A8, the activations per token) inside each Linear's forward, which is the
fake-quant semantics qeval uses.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

RECIPES = ("gptq_w4", "gptq_w4_sym", "awq_w4", "sq_w8a8", "rtn_w8a8")


def weight_only_scheme(group_size: int, symmetric: bool) -> dict:
    """4-bit integer weights in groups of ``group_size`` input columns (qeval's ``w4g<N>``)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def build_recipe(name: str, group_size: int, sq_alpha: float) -> list:
    """The modifiers for one named recipe (lm_head left in full precision, as in qeval).

    GPTQ and AWQ keep llm-compressor's defaults (GPTQ: act-order "static", dampening 0.01,
    128-column blocks; AWQ: 20-point grid, duo scaling).  W8A8 is compressed-tensors' preset:
    int8 symmetric per-channel weights, int8 symmetric dynamic per-token activations.
    """
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    ignore = ["lm_head"]
    if name in ("gptq_w4", "gptq_w4_sym"):
        return [GPTQModifier(config_groups=weight_only_scheme(group_size, name.endswith("sym")), ignore=ignore)]
    if name == "awq_w4":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        if not torch.cuda.is_available():
            # llm-compressor 0.14's AWQ pins its activation cache for faster host-to-GPU copies,
            # which raises on a machine without an accelerator; pinning is only a transfer
            # optimisation, so on CPU it is made a no-op
            torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
        return [AWQModifier(), QuantizationModifier(config_groups=weight_only_scheme(group_size, False), ignore=ignore)]
    if name == "sq_w8a8":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=sq_alpha),
            QuantizationModifier(targets="Linear", scheme="W8A8", ignore=ignore),
        ]
    if name == "rtn_w8a8":
        return [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a Hugging Face model folder (qeval's converted cache)")
    parser.add_argument("--recipe", required=True, choices=RECIPES)
    parser.add_argument("--calib-dataset", default="wikitext2_train")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=4, help="2048-token WikiText-2 test windows")
    parser.add_argument("--group-size", type=int, default=128, help="weight group size of the W4 recipes")
    parser.add_argument("--sq-alpha", type=float, default=0.5)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qeval.data import calibration_batches
    from qeval.eval.perplexity import perplexity

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    batches = calibration_batches(tokenizer, args.calib_dataset, args.nsamples, args.seqlen, args.seed, args.data_dir)
    calib = Dataset.from_dict(
        {"input_ids": [b[0].tolist() for b in batches], "attention_mask": [[1] * b.shape[1] for b in batches]}
    )

    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=calib,
        recipe=build_recipe(args.recipe, args.group_size, args.sq_alpha),
        num_calibration_samples=args.nsamples,
        max_seq_length=args.seqlen,
        shuffle_calibration_samples=False,
    )
    quantize_s = time.perf_counter() - start

    with torch.no_grad():
        result = perplexity(
            model, tokenizer, "wikitext2", seqlen=2048, max_windows=args.windows, data_dir=args.data_dir
        )
    print(
        "RESULT "
        + json.dumps(
            {
                "recipe": args.recipe,
                "ppl": result.ppl,
                "windows": result.windows,
                "quantize_s": quantize_s,
                "group_size": args.group_size,
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "llmcompressor": llmcompressor.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
