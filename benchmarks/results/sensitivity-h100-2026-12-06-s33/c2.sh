#!/usr/bin/env bash
# call 2 (right after call 1): the GGUF whole again, then the sensitivity benchmark for $SCHEMES
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=~/qk/site
cat ~/qk/a .dev/b/part > ~/qk/model.gguf && ls -la ~/qk/model.gguf && sha256sum ~/qk/model.gguf | cut -c1-16
S=${SCHEMES:-GPTQ}
timeout ${LIMIT:-560} python3 benchmarks/sensitivity.py --device cuda --model ~/qk/model.gguf --schemes $S $EXTRA \
  --json $OUT/sens-$S.json 2>$OUT/sens-$S.log | tee $OUT/sens-$S.md
tail -5 $OUT/sens-$S.log
