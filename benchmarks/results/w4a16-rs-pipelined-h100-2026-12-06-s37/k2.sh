#!/usr/bin/env bash
# call 2 (session 37): where the RS kernel's time goes (ablations: no x reloads / no word reloads / no unpacking
# arithmetic; wrong results on purpose, timing only), then W4A16 M 128 / 256 re-searched with the pipelined RS
# kernel, then the shipped configs vs cuBLAS
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s)
for v in tree nox now nounp; do
  RSV_NOCHECK=1 RSV_TILES=0,2,6,9,10 RSV_SHAPES=4096x4096,6144x4096,28672x4096 timeout 100 python gpu/rsv.py $v time > $OUT/abl-$v.log 2>&1
  echo "$v rc $? $(( $(date +%s) - t0 )) s"
done
timeout 240 python benchmarks/gemm.py --tune --tune-spec "w4a16:128,256" --ms 128,256 \
  --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --write-configs --json $OUT/tuned.json --md $OUT/tune.md \
  > $OUT/tune.log 2>&1
echo "tune rc $? $(( $(date +%s) - t0 )) s"
cp quantkit/kernels/configs/H100.json $OUT/H100.json 2>/dev/null; cp quantkit/kernels/configs/H200.json $OUT/H200.json 2>/dev/null
grep -E "^FAIL|configs:" $OUT/tune.log | cut -c1-250 | head -20
W4G_SHIPPED=1 W4G_QUICK=1 timeout 150 python gpu/w4g.py > $OUT/w4g-shipped.log 2>&1
echo "w4g rc $? $(( $(date +%s) - t0 )) s"
grep -h "^|" $OUT/abl-*.log
grep -E "^\||failures" $OUT/w4g-shipped.log
