#!/usr/bin/env bash
# a later call on the warm machine: the sensitivity benchmark for $SCHEMES (the GGUF already in ~/qk)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=~/qk/site
ls -la ~/qk/model.gguf || exit 3
S=${SCHEMES:-W8A8}
timeout ${LIMIT:-570} python3 benchmarks/sensitivity.py --device cuda --model ~/qk/model.gguf --schemes $S $EXTRA \
  --json $OUT/sens-$S.json 2>$OUT/sens-$S.log | tee $OUT/sens-$S.md
tail -5 $OUT/sens-$S.log
