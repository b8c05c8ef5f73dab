#!/usr/bin/env bash
# call 2 (right after c1): the GGUF whole again, then W8A8 selections: oracle on the scored pydoc text,
# near-oracle on the stdlib source, and all calibration windows of the builtin
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=~/qk/site
cat ~/qk/a .dev/b/part > ~/qk/model.gguf && ls -la ~/qk/model.gguf
run() { tag=$1; lim=$2; shift 2
  timeout $lim python3 benchmarks/sensitivity.py --device cuda --model ~/qk/model.gguf --schemes W8A8 "$@" \
    --json $OUT/sens-$tag.json 2>$OUT/sens-$tag.log | tee $OUT/sens-$tag.md
  rm -f $OUT/*selection.safetensors; tail -3 $OUT/sens-$tag.log; }
run w8a8-oracle-pydoc 200 --calib gpu/pydoc_eval.txt --select-windows 0 --draws 1
run w8a8-allcalib 180 --select-windows 0 --draws 1
run w8a8-oracle-code 200 --calib gpu/code_eval.txt --select-windows 0 --draws 1
