set -x
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
mkdir -p $OUT/a
T0=$(date +%s)
( QUANTKIT_CHECK_LAUNCH=1 timeout 110 python -m pytest -q -rf -n 8 -p no:cacheprovider tests/kernels/test_w8a8.py tests/kernels/test_gpu.py -k "pdl or gluon" > $OUT/a/tests.log 2>&1; echo tests rc=$? )
tail -1 $OUT/a/tests.log; grep -E "^FAILED|^ERROR" $OUT/a/tests.log | head -20
echo "t tests $(( $(date +%s) - T0 ))"
timeout 150 python benchmarks/gemm.py --tune --tune-spec "w8a8:256" --ms 256 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 --write-configs --md $OUT/a/tune256.md > $OUT/a/tune256.log 2>&1; echo tune rc=$?
echo "t tune $(( $(date +%s) - T0 ))"
mkdir -p $OUT/a/cfg256 && cp quantkit/kernels/configs/*.json $OUT/a/cfg256/
grep -E "^\{" $OUT/a/tune256.log | python -c "
import sys,json
for l in sys.stdin:
  d=json.loads(l); print(d['N'],d['K'],d['M'],'fp16',d['fp16'],'w8a8',d['w8a8'],d['w8a8_cfg'],'mix_i8',d.get('mix_i8'),'again',d.get('w8a8_again'),'mixf16',d.get('mix_f16'),'mixcfg',d.get('mix_cfg'))
"
grep -E "timed w8a8 M=256" $OUT/a/tune256.log | sort -t: -k2 | head -80
tar czf $OUT/a1.tgz -C $OUT a
timeout 130 python benchmarks/gemm.py --peers --tune-decode --tune-decode-kinds w8a8 --ms 1,16 --shapes 28672x4096,4096x14336 --gemlite .dev/gemlite-0.6.0 --write-configs > $OUT/a/decode.log 2>&1; echo decode rc=$?
echo "t decode $(( $(date +%s) - T0 ))"
cp quantkit/kernels/configs/*.json $OUT/a/
grep -iE "PDL" $OUT/a/decode.log | head -12
tail -32 $OUT/a/decode.log
cd $OUT && tar czf a.tgz a && rm -rf a a1.tgz
