#!/usr/bin/env bash
# call 4 (session 35): W4A16 configs searched on this GPU at M 128 and 512 (untimed buckets) and 2048 (hand-set)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv | tee $OUT/gpu.txt
for m in 128,512 2048; do
  t0=$(date +%s)
  timeout 280 python benchmarks/gemm.py --tune --tune-spec "w4a16:$m" --ms $m --write-configs --md $OUT/tune-w4a16-m${m/,/-}.md > $OUT/tune-w4a16-m${m/,/-}.log 2>&1
  echo "tune $m rc $? $(( $(date +%s) - t0 )) s"
  cp quantkit/kernels/configs/H100.json $OUT/H100.json
done
grep -iE "fail|error" $OUT/*.log | head
for f in $OUT/tune-w4a16-*.md; do echo "== $f"; grep -A12 -i "w4a16" $f | head -40; done
