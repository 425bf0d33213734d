#!/usr/bin/env bash
# The README's first command on a fresh clone in a fresh virtual environment, each phase timed, then the output
# evaluated against the unquantized model on the same windows.
# Usage: bash scripts/first_run.sh /path/to/llmq/checkout [EVAL_WINDOWS]
#   prints install, quantize (with llmq's own time by stage) and eval seconds, and the perplexity of the output and
#   of the unquantized model (wikitext2 test, EVAL_WINDOWS x 2048 tokens, default 40); works in /tmp/fresh*.
set -euo pipefail
checkout=$(cd "$1" && pwd)
windows=${2:-40}
test_text=$(cd "$checkout/.." && pwd)/shared/data/wikitext2_test.txt
rm -rf /tmp/fresh /tmp/fresh-venv /tmp/fresh-cache
git clone -q "$checkout" /tmp/fresh
cd /tmp/fresh
export LLMQ_CACHE=/tmp/fresh-cache  # a fresh machine has no converted copy of the embedded model yet
python3 -m venv /tmp/fresh-venv
source /tmp/fresh-venv/bin/activate
first=$(sed -n '/^```bash$/{n;p;q}' README.md)  # the README's first command, as written there
echo "README's first command: $first"
t0=$(date +%s)
install=${first%&& llmq quantize*}
bash -c "${install%&& }" > /tmp/fresh-install.log 2>&1
t1=$(date +%s)
llmq quantize 2> /tmp/fresh-quantize.log
t2=$(date +%s)
out=SmolLM2-135M-Instruct-gptq-w4g128
llmq eval "$out" --ppl "$test_text" --windows "$windows" --kl embedded > /tmp/fresh-eval.log 2> /tmp/fresh-eval.err
t3=$(date +%s)
echo "install: $((t1 - t0)) s; llmq quantize: $((t2 - t1)) s; llmq eval: $((t3 - t2)) s"
grep -E "^llmq: (wrote|time by stage)" /tmp/fresh-quantize.log | sed 's/\r//'
cat /tmp/fresh-eval.log
du -sh "$out"
