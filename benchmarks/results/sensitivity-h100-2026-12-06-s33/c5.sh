#!/usr/bin/env bash
# call 2 (right after c1): W8A8 selection made on exactly the pydoc text it is scored on (this Python's builtin eval half)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=~/qk/site:.
cat ~/qk/a .dev/b/part > ~/qk/model.gguf && ls -la ~/qk/model.gguf
python3 -c "from quantkit.calib.data import builtin_text; open('/tmp/pydoc_eval.txt','w').write(builtin_text('eval'))"
timeout 250 python3 benchmarks/sensitivity.py --device cuda --model ~/qk/model.gguf --schemes W8A8 --calib /tmp/pydoc_eval.txt \
  --select-windows 0 --draws 1 --json $OUT/sens-w8a8-oracle-exact.json 2>$OUT/sens-w8a8-oracle-exact.log | tee $OUT/sens-w8a8-oracle-exact.md
rm -f $OUT/*selection.safetensors; tail -3 $OUT/sens-w8a8-oracle-exact.log
