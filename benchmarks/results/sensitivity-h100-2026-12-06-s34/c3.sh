#!/usr/bin/env bash
# right after c1 (or on a warm machine with ~/qk/model.gguf): the sensitivity benchmark, one process per scheme
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=~/qk/site
[ -f .dev/b/part ] && cat ~/qk/a .dev/b/part > ~/qk/model.gguf
ls -la ~/qk/model.gguf || exit 3
for S in ${SCHEMES:-W8A8 W4A16g64}; do
  timeout ${LIMIT:-280} python3 benchmarks/sensitivity.py --device cuda --model ~/qk/model.gguf --schemes $S \
    --no-gptq-rtn-file --json $OUT/sens-$S.json 2>$OUT/sens-$S.log | tee $OUT/sens-$S.md
  tail -3 $OUT/sens-$S.log
done
