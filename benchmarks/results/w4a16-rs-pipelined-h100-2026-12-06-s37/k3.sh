#!/usr/bin/env bash
# call 3 (session 37): W4A16 M = 512 searched with the pipelined RS kernel among the candidates (dequantize +
# cuBLAS is one of them), then the GPU tests on the final configs; outputs in one tarball
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p /tmp/o
nvidia-smi --query-gpu=name --format=csv,noheader | tee /tmp/o/gpu.txt
which ncu nsys 2>&1; ls /usr/local/cuda*/bin 2>/dev/null | tr "\n" " " | cut -c1-400; echo
t0=$(date +%s)
timeout 150 python benchmarks/gemm.py --tune --tune-spec "w4a16:512" --ms 512 \
  --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --write-configs --json /tmp/o/tuned-512.json --md /tmp/o/tune-512.md \
  > /tmp/o/tune-512.log 2>&1
echo "tune rc $? $(( $(date +%s) - t0 )) s"
cp quantkit/kernels/configs/H100.json /tmp/o/H100.json 2>/dev/null
grep -E "^FAIL|configs:" /tmp/o/tune-512.log | cut -c1-250 | head
QUANTKIT_CHECK_LAUNCH=1 timeout 300 python -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_mixed.py tests/kernels/test_gpu.py tests/test_runtime_gpu.py > /tmp/o/gpu-tests.log 2>&1
echo "tests rc $? $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" /tmp/o/gpu-tests.log | head -20
for d in fp16 bf16; do OUT=/tmp/o RSV_DTYPE=$d RSV_TILES=0,2,6,9,10 timeout 60 python gpu/rsv.py tree time > /tmp/o/dtype-$d.log 2>&1; echo "$d rc $?"; done
grep -h "^|" /tmp/o/dtype-*.log
tar czf $OUT/k3.tgz -C /tmp/o .
grep -E "^\| [0-9]+ \| [0-9]+ \| 512 " /tmp/o/tune-512.md /tmp/o/gemm_log.txt 2>/dev/null | head
