#!/usr/bin/env bash
# call 7 (session 35): mixed study at M=512 with the new W8A8 configs, and the mixed call's host time
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 200 python gpu/host_mixed.py > $OUT/host-mixed.log 2>&1; echo "host rc $?"
grep -E "^N=|host us|tottime|^ +[0-9]" $OUT/host-mixed.log | cut -c1-150 | head -60
timeout 200 python benchmarks/gemm.py --mixed-study --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --ms 512 > $OUT/mixed-study.log 2>&1; echo "study rc $?"
sed -n "/^| N | K | M | W8A8 cfg/,\$p" $OUT/mixed-study.log | grep -v "KF=\|no TMA_F\|no cap"
