nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=. 
mkdir -p $OUT/r
( QUANTKIT_CHECK_LAUNCH=1 timeout 280 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_act_quant.py tests/kernels/test_w8a8.py tests/kernels/test_wna16.py tests/kernels/test_mixed.py tests/kernels/test_gpu.py tests/test_runtime_gpu.py > $OUT/r/tests.log 2>&1; echo tests rc=$? ) 
tail -8 $OUT/r/tests.log
timeout 60 python gpu/qx.py 2>&1 | tee $OUT/r/qx.log
timeout 220 python benchmarks/gemm.py --ms 2048,8192 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --md $OUT/r/main.md > $OUT/r/main.log 2>&1; echo gemm rc=$?
grep -A12 '^| N | K | M | FP16' $OUT/r/main.md | head -12
grep -A9 '^| target' $OUT/r/main.md
cd $OUT && tar czf r.tgz r && rm -rf r
