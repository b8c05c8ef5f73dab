#!/usr/bin/env bash
# call 1 (session 35): GPU tests of the mixed kernels, then the mixed-mode study (register cap) at M=256 and 2048
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/gpu.txt
git log --oneline -1 2>/dev/null | tee -a $OUT/gpu.txt
t0=$(date +%s)
QUANTKIT_CHECK_LAUNCH=1 timeout 200 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_gpu.py tests/test_runtime_gpu.py 2>&1 | tail -15 | tee $OUT/gpu-tests.log
echo "tests $(( $(date +%s) - t0 )) s" | tee -a $OUT/gpu-tests.log
t0=$(date +%s)
timeout 330 python benchmarks/gemm.py --mixed-study --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --ms 256,2048 2>&1 | tee $OUT/mixed-study.log | grep -v "^|" | tail -5
echo "study $(( $(date +%s) - t0 )) s"
sed -n '/^| N | K | M | W8A8 cfg/,$p' $OUT/mixed-study.log
