#!/usr/bin/env bash
# call 9 (session 35): GPU tests on the final kernels, and the persistent-TMA FP16-depth sweep again
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
t0=$(date +%s)
QUANTKIT_CHECK_LAUNCH=1 timeout 260 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_mixed.py tests/kernels/test_gpu.py tests/test_runtime_gpu.py > $OUT/gpu-tests.log 2>&1
echo "tests rc $? $(( $(date +%s) - t0 )) s" | tee -a $OUT/gpu-tests.log
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu-tests.log | head -20
timeout 120 python gpu/tma_mixed.py > $OUT/tma-mixed.log 2>&1; echo "sweep rc $?"
grep -c WRONG $OUT/tma-mixed.log; grep -E "SF=3" $OUT/tma-mixed.log
