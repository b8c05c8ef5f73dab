#!/usr/bin/env bash
# call 6 (session 35): W8A8 (and mixed) configs searched at M 512, where the M 2048 Gluon tiles stood in
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv | tee $OUT/gpu.txt
t0=$(date +%s)
timeout 450 python benchmarks/gemm.py --tune --tune-spec "w8a8:512" --ms 512 --write-configs --json $OUT/tune-w8a8-m512.json --md $OUT/tune-w8a8-m512.md > $OUT/tune-w8a8-m512.log 2>&1
echo "tune rc $? $(( $(date +%s) - t0 )) s"
cp quantkit/kernels/configs/H100.json $OUT/H100.json
grep -iE "fail|error" $OUT/tune-w8a8-m512.log | head -5
sed -n '/^| N | K | M | FP16 us/,/^$/p' $OUT/tune-w8a8-m512.md
