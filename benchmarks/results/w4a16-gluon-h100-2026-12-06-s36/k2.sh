#!/usr/bin/env bash
# call 6 (session 36): the Gluon W4A16 GPU tests (fixed: a tile that does not fit 8-bit words runs the tl.dot plan),
# then W4A16 at M = 64 re-ranked by CUDA-graph replay over rotating weight copies (the decode loop's cost), peers beside
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s)
QUANTKIT_CHECK_LAUNCH=1 timeout 150 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_gpu.py -k "gluon_w4a16 or grid or public" > $OUT/gpu-tests.log 2>&1
echo "tests rc $? $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu-tests.log | head -20
t0=$(date +%s)
timeout 240 python benchmarks/gemm.py --peers --tune-decode --tune-decode-kinds w4a16 --ms 64 --write-configs \
  --md $OUT/decode-m64.md > $OUT/decode-m64.log 2>&1
echo "decode tune rc $? $(( $(date +%s) - t0 )) s"
cp quantkit/kernels/configs/H100.json $OUT/H100.json
grep -E "^FAIL|configs:" $OUT/decode-m64.log | cut -c1-250 | head
grep -E "^\| [0-9]+ x [0-9]+ \| 64 |^\| N x K" $OUT/decode-m64.md | head -12
