#!/usr/bin/env bash
set -u
export PYTHONPATH=.
echo "=== pytest blocking N1000"
CUDA_LAUNCH_BLOCKING=1 timeout 90 python -m pytest -x -q -p no:cacheprovider tests/kernels/test_gpu.py -k "gemv_is_the_h2 and N1000 and 128-1-4-8" 2>&1 | grep -v Warning | grep -n "^E \|test_gpu.py:[0-9]\|wna16.py:[0-9]\|wna16_gluon.py:[0-9]\|passed\|failed" | head -30
export CUDA_LAUNCH_BLOCKING=1
v() { echo "=== $1"; timeout 60 python .dev/diag/gemv.py "$1" 2>&1 | grep -v Warning | grep -v "^desc" | tail -${2:-3}; }
v '{"N": 1000, "K": 1152, "zero": true}'
v '{"N": 1000, "K": 1152, "pdl": true}'
v '{"N": 1000, "K": 1152, "outlier": true}'
v '{"N": 1000, "K": 1152, "zero": true, "pdl": true, "outlier": true}'
v '{"N": 4000, "K": 1408, "zero": true}'
v '{"N": 4000, "K": 1408, "pdl": true}'
v '{"pdl": true}'
v '{"zero": true, "pdl": true}'
mkdir -p /tmp/san && cd /tmp/san && python -m zipfile -e /work/main/.dev/diag/*.whl . >/dev/null 2>&1; cd - >/dev/null
chmod -R +x /tmp/san/nvidia/cu13; SAN=/tmp/san/nvidia/cu13/bin/compute-sanitizer
export LD_LIBRARY_PATH=/tmp/san/nvidia/cu13/lib:/tmp/san/nvidia/cu13/bin:${LD_LIBRARY_PATH:-}
echo "=== sanitizer"
timeout 150 "$SAN" --print-limit 6 --target-processes all python .dev/diag/gemv.py '{"N": 1000, "K": 1152, "zero": true, "pdl": true}' 2>&1 | grep -v Warning | grep -v "^desc" | head -70
