#!/usr/bin/env bash
# call 5 (session 36): W4A16 configs searched at M 64, 128, 256 with the Gluon kernel among the candidates, then the
# GPU tests on the new configs
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/gpu.txt
t0=$(date +%s)
timeout 330 python benchmarks/gemm.py --tune --tune-spec "w4a16:64,128,256" --ms 64,128,256 \
  --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --write-configs --json $OUT/tuned.json --md $OUT/tune.md \
  > $OUT/tune.log 2>&1
echo "tune rc $? $(( $(date +%s) - t0 )) s"
cp quantkit/kernels/configs/H100.json $OUT/H100.json 2>/dev/null
grep -E "^FAIL|configs:" $OUT/tune.log | cut -c1-250 | head -20
t0=$(date +%s)
QUANTKIT_CHECK_LAUNCH=1 timeout 230 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_mixed.py tests/kernels/test_gpu.py tests/test_runtime_gpu.py > $OUT/gpu-tests.log 2>&1
echo "tests rc $? $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu-tests.log | head -30
grep -A3 "^| N | K | M" $OUT/tune.md | head -3; grep -E "^\| [0-9]+ \| [0-9]+ \| (64|128|256) " $OUT/tune.md | head -20
