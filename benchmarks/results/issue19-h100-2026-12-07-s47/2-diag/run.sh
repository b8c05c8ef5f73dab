#!/usr/bin/env bash
# diagnostic matrix for the TMA-fed GEMV; each variant in its own process
set -u
export PYTHONPATH=. CUDA_LAUNCH_BLOCKING=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m zipfile -e .dev/diag/*.whl /tmp/san >/dev/null 2>&1
SAN=$(find /tmp/san -name compute-sanitizer -type f | head -1); chmod +x "$SAN"; echo "sanitizer: $SAN"
v() { echo "=== $1"; timeout 60 python .dev/diag/gemv.py "$1" 2>&1 | grep -v Warning | tail -${2:-4}; }
v '{"dump": "base"}' 12
v '{"N": 1000, "K": 1152}'
v '{"zero": true}'
v '{"tile": [128, 2, 4, 4]}'
v '{"tile": [256, 4, 4, 6]}'
v '{"consts": {"STAGES": 2}}'
v '{"consts": {"LOAD_REGS": 24}}'
v '{"maxnreg": 128}'
v '{"maxnreg": 168}'
v '{"maxnreg": 0}'
echo "=== sanitizer memcheck base"
timeout 120 "$SAN" --print-limit 8 python .dev/diag/gemv.py '{}' 2>&1 | grep -v Warning | head -60
echo "=== sanitizer synccheck base"
timeout 90 "$SAN" --tool synccheck --print-limit 4 python .dev/diag/gemv.py '{}' 2>&1 | grep -v Warning | head -30
