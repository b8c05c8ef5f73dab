#!/usr/bin/env bash
# call 2 (right after c1): the GGUF whole again, then W8A8 and W4A16g64 with the --alone experiment
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=~/qk/site
cat ~/qk/a .dev/b/part > ~/qk/model.gguf && ls -la ~/qk/model.gguf && sha256sum ~/qk/model.gguf | cut -c1-16
for S in W8A8 W4A16g64; do
  timeout ${LIMIT:-280} python3 benchmarks/sensitivity.py --device cuda --model ~/qk/model.gguf --schemes $S --alone \
    --no-gptq-rtn-file --json $OUT/sens-$S-alone.json 2>$OUT/sens-$S-alone.log | tee $OUT/sens-$S-alone.md
  tail -4 $OUT/sens-$S-alone.log
done
