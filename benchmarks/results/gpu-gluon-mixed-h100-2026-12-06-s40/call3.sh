set -x
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
mkdir -p $OUT/r3
grep -n "^UNVERIFIED" quantkit/kernels/w8a8_gluon.py
( QUANTKIT_CHECK_LAUNCH=1 timeout 190 python -m pytest -q -rxXf -n 8 -p no:cacheprovider tests/kernels/test_gpu.py -k "gluon" > $OUT/r3/testsA.log 2>&1; echo testsA rc=$? )
tail -3 $OUT/r3/testsA.log; grep -c XPASS $OUT/r3/testsA.log; grep -E "^FAILED|^ERROR" $OUT/r3/testsA.log | head
timeout 75 python benchmarks/gemm.py --mixed-study --ms 512,2048 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 > $OUT/r3/mixedA.log 2>&1; echo mixedA rc=$?
grep -A11 '^| N | K | M | quantize' $OUT/r3/mixedA.log | head -11
cp gpu/w8a8_gluon_deferred.py quantkit/kernels/w8a8_gluon.py
timeout 75 python benchmarks/gemm.py --mixed-study --ms 512,2048 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 > $OUT/r3/mixedB.log 2>&1; echo mixedB rc=$?
grep -A11 '^| N | K | M | quantize' $OUT/r3/mixedB.log | head -11
grep -A11 '^| N | K | M | W8A8 cfg' $OUT/r3/mixedB.log | head -11
( QUANTKIT_CHECK_LAUNCH=1 timeout 190 python -m pytest -q -rxXf -n 8 -p no:cacheprovider tests/kernels/test_gpu.py -k "gluon" > $OUT/r3/testsB.log 2>&1; echo testsB rc=$? )
tail -3 $OUT/r3/testsB.log; grep -c XPASS $OUT/r3/testsB.log; grep -E "^FAILED|^ERROR" $OUT/r3/testsB.log | head
cd $OUT && tar czf r3.tgz r3 && rm -rf r3
