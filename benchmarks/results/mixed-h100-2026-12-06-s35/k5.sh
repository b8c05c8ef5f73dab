#!/usr/bin/env bash
# call 5 (session 35): the mixed-mode study at M=128 and 512 (where W8A8 borrows the M=256 / 2048 configs)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv | tee $OUT/gpu.txt
t0=$(date +%s)
timeout 300 python benchmarks/gemm.py --mixed-study --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --ms 128,512 > $OUT/mixed-study.log 2>&1
echo "study rc $? $(( $(date +%s) - t0 )) s"
grep -E "^skip|FAIL" $OUT/mixed-study.log | cut -c1-300 | head
sed -n "/^| N | K | M | W8A8 cfg/,\$p" $OUT/mixed-study.log | grep -v "KF=\|no TMA_F\|no cap"
