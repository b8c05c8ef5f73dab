set -x
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
mkdir -p $OUT/r
( QUANTKIT_CHECK_LAUNCH=1 timeout 300 python -m pytest -q -rxXf -n 8 -p no:cacheprovider tests/kernels/test_gpu.py -k "gluon or large_m" > $OUT/r/tests.log 2>&1; echo tests rc=$? )
grep -E "passed|failed|^FAILED|^ERROR|XPASS" $OUT/r/tests.log | sort | uniq -c | sort -rn | head -30
timeout 70 python benchmarks/gemm.py --mixed-study --ms 512,2048 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 > $OUT/r/mixed.log 2>&1; echo mixed rc=$?
grep -A12 '^| N | K | M | W8A8 cfg' $OUT/r/mixed.log | head -14
grep -A12 '^| N | K | M | quantize' $OUT/r/mixed.log | head -12
grep -i "skip\|failures\|FAIL" $OUT/r/mixed.log | head
timeout 150 python benchmarks/gemm.py --ms 512,2048 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --md $OUT/r/main.md > $OUT/r/main.log 2>&1; echo gemm rc=$?
grep -A10 '^| N | K | M | FP16' $OUT/r/main.md | head -11
cd $OUT && tar czf r.tgz r && rm -rf r
