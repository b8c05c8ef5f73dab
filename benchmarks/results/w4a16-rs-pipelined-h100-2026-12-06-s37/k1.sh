#!/usr/bin/env bash
# call 1 (session 37): GPU tests of the tree (session 36's final tree never passed whole on a GPU); meanwhile the
# RS-kernel variants' checks (compiles); then the variants timed one after another
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s)
(for v in base tree; do timeout 280 python gpu/rsv.py $v check > $OUT/check-$v.log 2>&1 & done; wait) &
CH=$!
QUANTKIT_CHECK_LAUNCH=1 timeout 330 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_mixed.py tests/kernels/test_gpu.py tests/test_runtime_gpu.py > $OUT/gpu-tests.log 2>&1
echo "tests rc $? $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu-tests.log | head -20
wait $CH
echo "checks done $(( $(date +%s) - t0 )) s"; cat $OUT/check-*.log | tail -40
for v in base tree; do timeout 90 python gpu/rsv.py $v time > $OUT/time-$v.log 2>&1; echo "$v rc $?"; done
echo "all done $(( $(date +%s) - t0 )) s"
grep -h "^|\|failures" $OUT/time-*.log
