set -u
T0=$(date +%s)
W=$HOME/issue19; mkdir -p $W
W4_DECODE_MS=1 SHAPES=4096x14336 STAGE_LIMIT=150 bash benchmarks/gpu_issue19.sh w4-decode > /dev/null 2>&1
STAGE_LIMIT=60 bash benchmarks/gpu_issue19.sh mixed-8192 mixed-256 > /dev/null 2>&1
echo "== final $(( $(date +%s) - T0 )) s" >> $W/stages.txt
timeout 220 env PYTHONPATH=. python benchmarks/gemm.py --peers --ms 1,16,256 --shapes 4096x4096,4096x14336,6144x4096,28672x4096 \
  --gemlite .dev/gemlite-0.6.0 --md $W/final.md > $W/final.log 2>&1
echo "== final rc=$? $(( $(date +%s) - T0 )) s" >> $W/stages.txt
cp quantkit/kernels/configs/*.json $W/ 
tar czf $OUT/issue19.tgz -C $W .
LEFT=$(( 585 - ($(date +%s) - T0) ))
echo "== check-all with $LEFT s" >> $W/stages.txt
timeout $LEFT env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -q -rf -n 14 -p no:cacheprovider \
   tests/kernels/test_gpu.py tests/kernels/test_w8a8.py tests/kernels/test_mixed.py tests/test_runtime_gpu.py > $W/check-all-2.log 2>&1
echo "== check-all rc=$? $(( $(date +%s) - T0 )) s" >> $W/stages.txt
tar czf $OUT/issue19.tgz -C $W .
cat $W/stages.txt | tail -12; tail -3 $W/check-all-2.log; sed -n '/W4A16 (bf16, g128), graph/,$p' $W/final.md | head -60
