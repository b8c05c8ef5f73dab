nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=. 
mkdir -p $OUT/r
( QUANTKIT_CHECK_LAUNCH=1 timeout 120 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_act_quant.py tests/kernels/test_wna16.py tests/kernels/test_gpu.py -k "not test_grid" > $OUT/r/tests.log 2>&1; echo tests rc=$? ) 
tail -3 $OUT/r/tests.log
timeout 110 python gpu/pre.py > $OUT/r/pre.log 2>&1; echo pre rc=$?; tail -24 $OUT/r/pre.log | grep '^|'
timeout 130 python benchmarks/gemm.py --tune --tune-spec 'w8a8:8192' --ms 8192 --shapes 4096x14336,28672x4096 --write-configs --md $OUT/r/tune8192.md > $OUT/r/tune8192.log 2>&1; echo tune rc=$?
grep -i 'w8a8 .*search' $OUT/r/tune8192.log | cut -c1-300
cp quantkit/kernels/configs/H100.json quantkit/kernels/configs/H200.json $OUT/r/
timeout 170 python benchmarks/gemm.py --ms 8192 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --md $OUT/r/main.md > $OUT/r/main.log 2>&1; echo gemm rc=$?
grep -A6 '^| N | K | M | FP16' $OUT/r/main.md | head -7
cd $OUT && tar czf r.tgz r && rm -rf r
