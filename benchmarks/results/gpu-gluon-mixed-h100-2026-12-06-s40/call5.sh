set -x
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
mkdir -p $OUT/r5
( QUANTKIT_CHECK_LAUNCH=1 timeout 280 python -m pytest -q -rf -n 8 -p no:cacheprovider tests/kernels/test_gpu.py tests/kernels/test_mixed.py tests/kernels/test_w8a8.py tests/test_runtime_gpu.py > $OUT/r5/tests.log 2>&1; echo tests rc=$? )
tail -1 $OUT/r5/tests.log; grep -E "^FAILED|^ERROR" $OUT/r5/tests.log | head -20
cd $OUT && tar czf r5.tgz r5 && rm -rf r5
