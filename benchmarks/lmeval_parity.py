"""Check that qeval's task scores equal lm-eval's own scoring on the same model and file.

lm-eval is run the way a user runs it (``model="hf"`` from a model folder,
its registered task, e.g. ``lambada_openai``) with only the dataset location
replaced by the local file; qeval runs its plugin task on the in-memory model
loaded by qeval.  Both numbers are printed side by side.

    python benchmarks/lmeval_parity.py --model smollm2-135m --limit 500
"""

from __future__ import annotations

import argparse
import time

from hydra import compose, initialize_config_dir

from qeval.cli import CONF_DIR
from qeval.data import local_file
from qeval.eval.harness import evaluate_lm_eval
from qeval.models.loading import load_model, resolve_pretrained_path

# qeval task -> (lm-eval task, local file that replaces its Hub dataset)
PAIRS = {
    "qeval_lambada_openai": ("lambada_openai", "lambada/lambada_test.jsonl"),
}


def lm_eval_reference(pretrained: str, task: str, data_file: str, limit: int | None, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = TaskManager()
    # lm-eval's own registered config, with only the dataset location replaced
    spec = load_yaml(tm.task_index[task].yaml_path, resolve_func=True)
    spec.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": data_file}})
    out = simple_evaluate(model="hf", model_args={"pretrained": pretrained, "dtype": "float32"},
                          tasks=[spec], limit=limit, batch_size=batch_size, device="cpu",
                          task_manager=tm, bootstrap_iters=1000, log_samples=False)
    return out["results"][task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"model={args.model}"])
    pretrained = resolve_pretrained_path(cfg.model, cfg.cache_dir)
    loaded = load_model(cfg.model, cfg.cache_dir)
    rows = []
    for qeval_task, (ref_task, rel) in PAIRS.items():
        path = local_file(rel)
        if path is None:
            raise SystemExit(f"{rel} not found under the data directory; set QEVAL_DATA_DIR")
        t0 = time.perf_counter()
        ours = evaluate_lm_eval(loaded.model, loaded.tokenizer, qeval_task, args.limit, 0, args.batch_size)
        t1 = time.perf_counter()
        ref = lm_eval_reference(pretrained, ref_task, str(path), args.limit, args.batch_size)
        t2 = time.perf_counter()
        for metric in ("acc", "perplexity"):
            rows.append((qeval_task, ref_task, metric, ours[metric], ref[f"{metric},none"], t1 - t0, t2 - t1))
    print(f"\nmodel {args.model}, limit {args.limit}\n")
    print("| qeval task | lm-eval task | metric | qeval | lm-eval | equal | qeval s | lm-eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for q, r, m, a, b, ta, tb in rows:
        print(f"| {q} | {r} | {m} | {a:.6f} | {b:.6f} | {abs(a - b) <= 1e-9 * max(1, abs(b))} | {ta:.1f} | {tb:.1f} |")


if __name__ == "__main__":
    main()
