#!/usr/bin/env bash
# call 1: stash the GGUF's first half in $HOME (kept while warm), install gguf; if an H200, tune W4A16 M=1
set -o pipefail
export PYTHONUNBUFFERED=1
mkdir -p ~/qk && cp .dev/a/part ~/qk/a && ls -la ~/qk
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/qk/site .whl/*.whl && echo wheels ok
