#!/usr/bin/env bash
# The one device run issue 5 needs (an H100/H200 lent through the `device` tool; its image has torch, nvcc, ninja):
# build the kernel, run the GPU tests, then the kernel table and the 8B decode. Everything lands in $OUT.
#   device run: bash scripts/gpu_check.sh        (timeout_s 540; about 5-7 minutes, the first build ~1 minute)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LLMQ_CACHE=/tmp/llmq-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest tests/test_kernels.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
timeout 300 python3 scripts/bench_kernel.py --gpu --decode 2>"$OUT/bench.err" | tee "$OUT/bench_kernel.md"
