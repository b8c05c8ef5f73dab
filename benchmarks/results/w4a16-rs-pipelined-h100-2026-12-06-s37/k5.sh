#!/usr/bin/env bash
# call 5 (session 37): M = 256, more RS tiles (3-stage 256 x 128, 64-row tiles, 4-stage 128 x 128) beside the shipped
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
RSV_MS=256 RSV_TILES=6,3,10,11,0,2,12,13,14,15,16,17,18,19 timeout 170 python gpu/rsv.py tree time > $OUT/m256-tiles.log 2>&1
echo "rc $?"
grep -E "^\||failures|^skip" $OUT/m256-tiles.log
python3 - <<'PY'
import json, os
for l in open(os.path.join(os.environ["OUT"], "m256-tiles.log")):
    if l.startswith("{"):
        r = json.loads(l); print(r["N"], r["M"], round(r["cublas"], 1), sorted((round(v, 1), k) for k, v in r["all"].items())[:5])
PY
