#!/usr/bin/env bash
# calls 2 and 3 (session 35, run twice: before and after the persistent pass): GPU tests, then the mixed-mode study at M=256 and 2048
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/gpu.txt
t0=$(date +%s)
QUANTKIT_CHECK_LAUNCH=1 timeout 240 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_mixed.py tests/kernels/test_gpu.py tests/test_runtime_gpu.py > $OUT/gpu-tests.log 2>&1
echo "tests rc $? $(( $(date +%s) - t0 )) s" | tee -a $OUT/gpu-tests.log
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu-tests.log | head -30
t0=$(date +%s)
timeout 300 python benchmarks/gemm.py --mixed-study --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --ms 256,2048 > $OUT/mixed-study.log 2>&1
echo "study rc $? $(( $(date +%s) - t0 )) s"
grep -E "^skip|FAIL" $OUT/mixed-study.log | cut -c1-300 | head
sed -n '/^| N | K | M | W8A8 cfg/,$p' $OUT/mixed-study.log
