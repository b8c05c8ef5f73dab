set -x
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
mkdir -p $OUT/r
( QUANTKIT_CHECK_LAUNCH=1 timeout 270 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_gpu.py -k "gluon or large_m or tma" tests/kernels/test_mixed.py tests/kernels/test_w8a8.py tests/kernels/test_fused.py tests/kernels/test_attention.py tests/test_runtime_gpu.py > $OUT/r/tests.log 2>&1; echo tests rc=$? )
grep -E "passed|failed|^FAILED|^ERROR" $OUT/r/tests.log | tail -25
timeout 60 python benchmarks/gemm.py --mixed-study --ms 512,2048 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 > $OUT/r/mixed.log 2>&1; echo mixed rc=$?
grep -A12 '^| N | K | M | W8A8 cfg' $OUT/r/mixed.log | head -14
grep -A12 '^| N | K | M | quantize' $OUT/r/mixed.log | head -12
grep -i "skip\|failures" $OUT/r/mixed.log | head
timeout 100 python benchmarks/gemm.py --ms 2048 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --md $OUT/r/main2048.md > $OUT/r/main2048.log 2>&1; echo gemm rc=$?
grep -A6 '^| N | K | M | FP16' $OUT/r/main2048.md | head -7
cd $OUT && tar czf r.tgz r && rm -rf r
