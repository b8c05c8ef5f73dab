nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=. 
mkdir -p $OUT/r
( QUANTKIT_CHECK_LAUNCH=1 timeout 150 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_act_quant.py tests/kernels/test_wna16.py > $OUT/r/tests.log 2>&1; echo tests rc=$? ) 
tail -3 $OUT/r/tests.log
timeout 150 python benchmarks/gemm.py --tune --tune-spec 'w8a8:8192' --ms 8192 --shapes 4096x14336,28672x4096 --write-configs --md $OUT/r/tune8192.md > $OUT/r/tune8192.log 2>&1; echo tune rc=$?
grep -i 'search' $OUT/r/tune8192.log | cut -c1-400
cp quantkit/kernels/configs/H100.json $OUT/r/
timeout 240 python benchmarks/gemm.py --ms 4096,8192 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --md $OUT/r/main.md > $OUT/r/main.log 2>&1; echo gemm rc=$?
grep -A10 '^| N | K | M | FP16' $OUT/r/main.md | head -11
cd $OUT && tar czf r.tgz r && rm -rf r
