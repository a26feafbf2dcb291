"""Are the numbers unchanged?  Quantize tiny random models of several families with every
method and save their logits; run it on two checkouts and compare, bit for bit.

    PYTHONPATH=/path/to/old/checkout python benchmarks/quantized_logits.py save old.pt
    python benchmarks/quantized_logits.py save new.pt
    python benchmarks/quantized_logits.py compare old.pt new.pt

Prints one line per (family, method, preset) that differs or changed status (refused <-> ran),
then a count of identical cells.  A refactoring that leaves every number alone shows
"different 0"; a new capability shows as "refused -> ran".
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "opt", "mixtral", "qwen3_moe", "granitemoe", "olmo2"]
METHODS = [
    ("rtn", "w4g32"),
    ("gptq", "w4g32"),
    ("awq", "w4g32"),
    ("omniquant", "w4g32"),
    ("quarot", "w4g32"),
    ("smoothquant", "w8a8"),
    ("omniquant", "w8a8"),
    ("gptq", "w8a8"),
]


def save(path: str, families: list[str]) -> None:
    from qeval.config import ActivationSpec, QuantSpec, WeightSpec
    from qeval.models.tiny import build_tiny_model
    from qeval.quant.apply import quantize_model
    from qeval.quant.recipe import get_method

    specs = {
        "w4g32": QuantSpec(name="w4g32", w=WeightSpec(bits=4, group_size=32)),
        "w8a8": QuantSpec(name="w8a8", w=WeightSpec(bits=8, granularity="channel"), a=ActivationSpec(bits=8)),
    }
    calib = [torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(9))
    out: dict[tuple[str, str, str], object] = {}
    for family in families:
        for method, preset in METHODS:
            model = build_tiny_model(family)
            try:
                quantize_model(model, specs[preset], get_method(method), calibration=lambda: calib)
            except Exception as err:  # a refusal is a result too: it must not change silently
                out[family, method, preset] = f"{type(err).__name__}"
                continue
            with torch.no_grad():
                out[family, method, preset] = model(x).logits
    torch.save(out, path)
    print(f"saved {len(out)} cells to {path}")


def compare(old_path: str, new_path: str) -> None:
    old, new = torch.load(old_path), torch.load(new_path)
    same = different = 0
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "absent"), new.get(key, "absent")
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if torch.equal(a, b):
                same += 1
            else:
                different += 1
                print(f"{key}: max |difference| {(a - b).abs().max().item():.3g}")
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            print(
                f"{key}: {'ran' if isinstance(a, torch.Tensor) else a} -> {'ran' if isinstance(b, torch.Tensor) else b}"
            )
    print(f"identical {same}, different {different}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("path")
    s.add_argument("--families", default=",".join(FAMILIES))
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.command == "save":
        save(args.path, args.families.split(","))
    else:
        compare(args.old, args.new)


if __name__ == "__main__":
    main()
