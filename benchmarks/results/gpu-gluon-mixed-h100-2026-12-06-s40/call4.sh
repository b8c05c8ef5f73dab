set -x
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
mkdir -p $OUT/r4
for v in deferred F G; do
  cp gpu/w8a8_gluon_$v.py quantkit/kernels/w8a8_gluon.py
  timeout 75 python benchmarks/gemm.py --mixed-study --ms 512,2048 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 > $OUT/r4/mixed_$v.log 2>&1; echo mixed $v rc=$?
  grep -A11 '^| N | K | M | quantize' $OUT/r4/mixed_$v.log | tail -8
done
for v in G F; do
  cp gpu/w8a8_gluon_$v.py quantkit/kernels/w8a8_gluon.py
  ( QUANTKIT_CHECK_LAUNCH=1 timeout 120 python -m pytest -q -rxXf -n 8 -p no:cacheprovider tests/kernels/test_gpu.py -k "gluon" > $OUT/r4/tests_$v.log 2>&1; echo tests $v rc=$? )
  tail -1 $OUT/r4/tests_$v.log; grep -E "^FAILED|^ERROR" $OUT/r4/tests_$v.log | head -5
done
cd $OUT && tar czf r4.tgz r4 && rm -rf r4
