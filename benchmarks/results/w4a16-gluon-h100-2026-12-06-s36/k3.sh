#!/usr/bin/env bash
# call 9 (session 36): GPU tests on the final tree (RS entries shipped at M 128 / 256), then the shipped W4A16
# configs against cuBLAS fp16 at M 64, 128, 256 (eager and graph; W4G_SHIPPED=1: no candidate sweep)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s)
QUANTKIT_CHECK_LAUNCH=1 timeout 200 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_gpu.py tests/test_runtime_gpu.py > $OUT/gpu-tests.log 2>&1
echo "tests rc $? $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu-tests.log | head -20
W4G_SHIPPED=1 W4G_QUICK=1 timeout 150 python gpu/w4g.py > $OUT/w4g-shipped.log 2>&1
echo "w4g rc $?"; grep -E "^\||failures" $OUT/w4g-shipped.log
