#!/usr/bin/env bash
# Issue 18's GPU checks as one script, for a machine with a CUDA GPU (docs/BENCHMARKS.md "On a GPU"):
# the gpu-marked tests, then a Llama-3-8B-shaped random model (bfloat16, no download) through
# fp16, w4g128 RTN, kv4 and GPTQ w4g128 resident on the GPU, then GPTQ again with the weights
# offloaded to CPU memory (one block at a time on the GPU).  Prints the tables to paste.
#   bash benchmarks/gpu_check.sh [/tmp/llama8b]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/llama8b}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -m gpu -rs tests/test_gpu.py
python benchmarks/big_model.py --shape llama3-8b --params 8.03e9 --dtype bfloat16 --device cuda \
    --out "$out" --results /tmp/qeval-gpu-resident
python benchmarks/big_model.py --shape llama3-8b --params 8.03e9 --dtype bfloat16 --device cuda \
    --offload always --out "$out" --results /tmp/qeval-gpu-offloaded
