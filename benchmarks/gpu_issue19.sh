#!/usr/bin/env bash
# Issue 19's GPU measurements as stages, for the device tool (one call: at most 600 s). Run from the repository root
# on the GPU machine, the stages in the order of what matters most, as many per call as fit:
#
#   RT_LIMIT=300 bash benchmarks/gpu_issue19.sh runtime-eager   # the runtime's decode without graphs, replays
#                                                  # on / off (session 56 built it; its call was refused)
#   STAGE_LIMIT=200 PEER_MS=1,16,256 bash benchmarks/gpu_issue19.sh check-lean peers   # session 56 ran it twice on
#                                                  # an H100 (every test passed; W8A8 eager at M <= 16 now ahead
#                                                  # of every peer): after a launch-path change, and for the clean
#                                                  # lean-launch A/B (the A/Bs now run with replays off); carry
#                                                  # .dev/gemlite-0.6.0
#   (eager: since session 56 its candidates and the plain entry are timed through replays, as the shipped entry
#   is in the table; not yet run that way)
#   STAGE_LIMIT=380 bash benchmarks/gpu_issue19.sh eager   # the EAGER configs by what a call outside a graph
#                                                  # costs (the larger of eager and host time), then the table at
#                                                  # M = 1, 16 on the entries written (carry .dev/gemlite-0.6.0;
#                                                  # session 55 ran it only at 4096x14336 and 28672x4096, ranked by
#                                                  # eager time alone, kept every plain entry, 111 s for those two)
#   STAGE_LIMIT=200 PEER_MS=1,16,256,2048 bash benchmarks/gpu_issue19.sh peers   # the status table on the
#                                                  # configs as shipped (bench_rounds), the host-time table, our calls'
#                                                  # host profiles and the memo / RawLaunch on-off A/B; the shipped
#                                                  # entry timed with config=None, as the runtime calls it; GemLite's
#                                                  # inexact W4 GEMV timed and marked (carry .dev/gemlite-0.6.0).
#                                                  # Session 54 ran it on an H100; next on an H200 (the list below)
#   STAGE_LIMIT=280 CHECK_WORKERS=15 bash benchmarks/gpu_issue19.sh check-all-rest check-all-gpu
#                                                  # after a change to the kernels or their launch (session 53
#                                                  # completed the pass on an H100: 868 passed, 0 failed)
#   STAGE_LIMIT=300 SHAPES=28672x4096 bash benchmarks/gpu_issue19.sh w4-decode
#                                                  # sessions 50-54 searched W4A16 M = 1 / 16 at 4096x4096,
#                                                  # 4096x14336 and 6144x4096 (no change; one shape takes 85 s on a
#                                                  # warm compile cache, over 300 s on a cold one; carry
#                                                  # .dev/gemlite-0.6.0; `echo PDL_CHAIN >> ~/.gemm_skip_keys`
#                                                  # first: those twins rank back to back and lose in the runtime)
#   STAGE_LIMIT=60 bash benchmarks/gpu_issue19.sh mixed-8192 mixed-256   # mixed with no FP16 row against W8A8,
#                                                  # timed interleaved (bench_paired): within 1.7% at M = 8192
#                                                  # in both of session 51's runs; M = 256 eager swings (host):
#                                                  # since session 56 the pair is also timed through replays (the
#                                                  # log's last table), the form the runtime's calls take
#   RT_TUNE=1 RT_LIMIT=260 bash benchmarks/gpu_issue19.sh runtime-chain   # the W4A16 M = 1 CHAINED choices by
#                                                  # the runtime's own step time (runtime.py --tune-chained; session
#                                                  # 54, H100: 6144x4096 now PDL), written, then the A/B (chain
#                                                  # on / on with plain entries / off) on them; without RT_TUNE the
#                                                  # A/B alone, after any config change
#   On an H200 (H200.json, last searched in session 41: none of the TMA-fed GEMV, warp-specialized RS or
#   MIXED_PASS there): CHECK_WORKERS=8 check-gemv check-ws, w4-decode (GEMM_ONLY_KEYS=TMA_RING), w4-256
#   (GEMM_ONLY_KEYS=RS), w8a8-8192 mixed-8192, w8a8-256 mixed-256.
#
# (w4-decode, w8-decode, peers: GemLite, carry .dev/gemlite-0.6.0.) Each stage logs into $WORK (default ~/issue19: the
# machine keeps its home directory between back-to-back calls) as <stage>.log (and .md tables where gemm.py writes
# them), with the config files as it left them in configs-<stage>/; after every stage all of $WORK is packed into
# $OUT/issue19.tgz and stages.txt copied beside it: the device returns at most 8 files, and a call cut at its limit
# still returns what its finished stages measured. The next call's tree is re-sent from the developer's machine:
# copy the configs back into quantkit/kernels/configs/ there first, or the device's edits are lost. STAGE_LIMIT
# (seconds) caps each stage (default 280), SHAPES overrides the shapes (W4_MS the w4-256 stage's Ms).
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/gpu_issue19}
WORK=${WORK:-$HOME/issue19}
mkdir -p "$OUT" "$WORK"
LIMIT=${STAGE_LIMIT:-280}
# the shapes where a target is missed first: a search cut at its limit keeps what it finished (--write-configs
# writes after each shape; SHAPES overrides)
SHAPES=${SHAPES:-4096x4096,4096x14336,6144x4096,28672x4096}
GEMLITE=${GEMLITE:-.dev/gemlite-0.6.0}
STAGES="eager check-lean runtime-eager check-eager check check-ws check-gemv check-chain check-all check-all-gpu check-all-rest runtime-chain w4-decode-parts w4-decode-fit w4-decode-timeline w8a8-8192 w8a8-2048 w8a8-256 mixed-256 mixed-8192 w4-decode w8-decode w4-256 peers"
for stage in "$@"; do
  [[ " $STAGES " == *" $stage "* ]] || { echo "unknown stage: $stage (stages: $STAGES)" >&2; exit 2; }
done
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$WORK/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$WORK/device.txt"

run() {  # run <stage> <command...>: time-limited, log into $WORK, configs copied after, $WORK packed into $OUT
    local stage=$1; shift
    local t0=$(date +%s)
    echo "== $stage: $*" | tee -a "$WORK/stages.txt"
    timeout "${RUN_LIMIT:-$LIMIT}" "$@" > "$WORK/$stage.log" 2>&1
    local rc=$?
    mkdir -p "$WORK/configs-$stage" && cp quantkit/kernels/configs/*.json "$WORK/configs-$stage/"
    echo "== $stage rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$WORK/stages.txt"
    tail -3 "$WORK/$stage.log"
    pack
    return $rc
}

pack() { tar czf "$OUT/issue19.tgz" -C "$WORK" . && cp "$WORK/stages.txt" "$OUT/"; }

# kernel forms whose GPU check failed this machine's session (check stages): later searches leave their configs
# out (gemm.py's GEMM_SKIP_KEYS), so a wrong or hanging form cannot eat a time-limited search
SKIP_FILE=$HOME/.gemm_skip_keys  # (kept while the machine is: rm it to re-check a fixed form on a warm machine)
skip() { echo "$1" >> "$SKIP_FILE"; echo "== $1 configs left out of later searches" | tee -a "$WORK/stages.txt"; }
skip_keys() { [ -f "$SKIP_FILE" ] && sort -u "$SKIP_FILE" | paste -sd, -; }

check_ws() {  # the warp-specialized kernels (W8A8's, W4A16's register-operand one): a failed or hanging one's
  # configs are left out of later searches (W4A16's alone where only its tests failed)
  RUN_LIMIT=${WS_LIMIT:-180} run check-ws env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -q -rf -n "${CHECK_WORKERS:-4}" \
    -p no:cacheprovider tests/kernels/test_gpu.py tests/kernels/test_w8a8.py -k "warp_spec"
  local rc=$?
  grep -E "^FAILED|^ERROR" "$WORK/check-ws.log" | head -10
  if grep -E "^(FAILED|ERROR)" "$WORK/check-ws.log" | grep -qv w4a16; then skip WARP_SPECIALIZE
  elif [ $rc -ne 0 ]; then skip RS+WARP_SPECIALIZE; fi
}

for stage in "$@"; do
  export GEMM_SKIP_KEYS=$(skip_keys)
  case $stage in
    check)  # the forms built without a GPU first: split-K and warp-specialized Gluon W8A8, the packed-x
      # W4A16 GEMV, PREFETCH; the warp-specialized kernel apart, under its own limit (a hang there stops only it)
      run check env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -q -rf -n 8 -p no:cacheprovider tests/kernels/test_gpu.py \
        tests/kernels/test_w8a8.py -k "(gluon or packed or pdl or gemv_fused) and not warp_spec"
      grep -E "^FAILED|^ERROR" "$WORK/check.log" | head -30
      check_ws ;;
    check-eager)  # the EAGER configs (a real capture against eager calls) and the GEMV / small-M launches whose
      # specialization keys session 54 shrank (QUANTKIT_CHECK_LAUNCH=1 checks every cached launch's key)
      RUN_LIMIT=${EAGER_CHECK_LIMIT:-150} run check-eager env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -q -rf \
        -n "${CHECK_WORKERS:-8}" -p no:cacheprovider tests/kernels/test_w8a8.py tests/kernels/test_wna16.py \
        tests/test_fast_launch.py -k "eager_config or gemv or pdl or quant_once or fast_launch or interpret_mode"
      grep -E "^FAILED|^ERROR" "$WORK/check-eager.log" | head -20 ;;
    check-lean)  # session 56's lean launch (each cached kernel's C launch called below Triton's launcher, tensors as
      # addresses) and replays (a kind of call's recorded C launches sent again): their GPU tests, bit for bit
      # against the wrapper on every shape at M = 1, 16, 256, eager and in CUDA graphs; the public fast path; the
      # descriptor memo's, the fast launch's and the replays' CPU tests on this Triton. Replays are off under
      # QUANTKIT_CHECK_LAUNCH, so the lean tests run with it and the replay tests without
      RUN_LIMIT=${LEAN_CHECK_LIMIT:-150} run check-lean bash -c "env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -q -rf \
        -n ${CHECK_WORKERS:-8} -p no:cacheprovider tests/kernels/test_gpu.py tests/kernels/test_tma_memo.py \
        tests/test_fast_launch.py -k 'lean or public_fast_path or raw_launch or direct_launch or cached_launch' && \
        python -m pytest -q -rf -n ${CHECK_WORKERS:-8} -p no:cacheprovider tests/kernels/test_gpu.py \
        tests/test_replay.py -k 'replay'"
      grep -E "^FAILED|^ERROR" "$WORK/check-lean.log" | head -20 ;;
    check-ws)  # the warp-specialized kernel's tests alone (MIXED_PASS among them)
      check_ws ;;
    check-gemv)  # the TMA-fed W4A16 GEMV (TMA_RING) and its PDL_CHAIN: a failure leaves its configs out of later
      # searches (PDL_CHAIN's alone where only the chain's tests failed)
      RUN_LIMIT=${GEMV_LIMIT:-150} run check-gemv env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -q -rf -n "${CHECK_WORKERS:-4}" \
        -p no:cacheprovider tests/kernels/test_gpu.py tests/kernels/test_wna16.py \
        -k "gemv_is_the_h2 or gemv_pdl_chain or chained_config"
      rc=$?
      grep -E "^FAILED|^ERROR" "$WORK/check-gemv.log" | head -10
      if grep -E "^(FAILED|ERROR)" "$WORK/check-gemv.log" | grep -qv pdl_chain; then skip TMA_RING
      elif [ $rc -ne 0 ]; then skip PDL_CHAIN; fi ;;
    check-chain)  # PDL_CHAIN: W8A8's GEMV (a failure leaves its chain configs out of later searches; W4A16's is in
      # check-gemv)
      RUN_LIMIT=${GEMV_LIMIT:-150} run check-chain env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -q -rf -n "${CHECK_WORKERS:-4}" \
        -p no:cacheprovider tests/kernels/test_w8a8.py -k "pdl_chain or gemv_fused_quant"
      rc=$?
      grep -E "^FAILED|^ERROR" "$WORK/check-chain.log" | head -10
      [ $rc -ne 0 ] && skip PDL_CHAIN ;;
    check-all|check-all-gpu|check-all-rest)  # every GPU kernel test (session 50: 975 of 983 in 330 s, 15 workers,
      # on an H100), or its halves: test_gpu.py (641 tests) and the rest (342), each short enough to finish and
      # print its slowest tests
      files="tests/kernels/test_gpu.py tests/kernels/test_w8a8.py tests/kernels/test_mixed.py tests/test_runtime_gpu.py"
      [ "$stage" = check-all-gpu ] && files=tests/kernels/test_gpu.py
      [ "$stage" = check-all-rest ] && files="tests/kernels/test_w8a8.py tests/kernels/test_mixed.py tests/test_runtime_gpu.py"
      # -v names each finished test: a stage cut at its limit lists the ones that never finished (session 52:
      # check-all-rest stopped twice at 339 of 342, the same three running on; pytest's faulthandler dumps where
      # a test still runs after CHECK_TEST_LIMIT s)
      run "$stage" env QUANTKIT_CHECK_LAUNCH=1 python -m pytest -v -rf -n "${CHECK_WORKERS:-8}" -p no:cacheprovider \
        -o faulthandler_timeout="${CHECK_TEST_LIMIT:-120}" --durations=15 $files
      rc=$?
      grep -E "^FAILED|^ERROR" "$WORK/$stage.log" | head -30
      if [ $rc -eq 124 ]; then
        python -m pytest --collect-only -q -p no:cacheprovider $files 2>/dev/null | grep "::" | sort > "$WORK/$stage.collected"
        grep -oE "(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) tests/[^ ]+" "$WORK/$stage.log" | awk '{print $2}' | sort -u \
          > "$WORK/$stage.finished"
        comm -23 "$WORK/$stage.collected" "$WORK/$stage.finished" | tee "$WORK/$stage.unfinished" | head -20
      fi ;;
    w8a8-8192|w8a8-2048)  # W8A8 M >= 2048 >= 1.35x cuBLAS: the warp-specialized Gluon candidates among the rest
      m=${stage#w8a8-}
      run "$stage" python benchmarks/gemm.py --tune --tune-spec "w8a8:$m" --ms "$m" --shapes $SHAPES \
        --tune-rank graph --write-configs --md "$WORK/$stage.md" ;;
    w8a8-256)  # M = 256 with Gluon K splits (4096 x 14336) and the PDL tiles, ranked by graph replay
      run w8a8-256 python benchmarks/gemm.py --tune --tune-spec "w8a8:256" --ms 256 --shapes $SHAPES \
        --tune-rank graph --write-configs --md "$WORK/w8a8-256.md" ;;
    mixed-256)  # mixed mode with no FP16 row within 3% of W8A8, on the configs just written
      run mixed-256 python benchmarks/gemm.py --mixed-study --ms 256 --shapes $SHAPES ;;
    mixed-8192)
      run mixed-8192 python benchmarks/gemm.py --mixed-study --ms 8192 --shapes $SHAPES ;;
    w4-decode-parts)  # W4A16 M = 1 by part (28672x4096, 4096x14336, 4096x4096; SHAPES_PARTS overrides)
      # (PARTS_WRITE=1: each shape's CHAINED choice, behind the runtime's norm, written into the config file)
      run w4-decode-parts python benchmarks/gemm.py --decode-parts --shapes "${SHAPES_PARTS:-28672x4096,4096x14336,4096x4096}" \
        ${PARTS_WRITE:+--write-configs} ;;
    w4-decode-fit)  # W4A16 M = 1 time against bytes (8 sizes, 2-60 MB): each kernel's fixed cost and rate
      run w4-decode-fit python benchmarks/gemm.py --decode-fit ;;
    w4-decode-timeline)  # the TMA-fed GEMV's timestamped build: launch gaps, start spread, first slot, loop, epilogue
      run w4-decode-timeline python benchmarks/gemm.py --decode-timeline ;;
    runtime-chain)  # the runtime's PDL chain (kernels._common.CHAIN_PDL): its GPU tests (bit for bit against plain
      # launches, graph against eager), then decode speed with it on and off in one process (RT_LAYERS of Llama-3-8B)
      RUN_LIMIT=${RT_LIMIT:-300} run runtime-chain bash -c "python -m pytest -q -rf -p no:cacheprovider \
        tests/test_runtime_gpu.py -k 'pdl_chain or chained or graph_replay' && python benchmarks/runtime.py --chain-ab \
        --skip hf,monitor,mixed,att --layers ${RT_LAYERS:-16} --gen-len ${RT_GEN:-64} --json $WORK/runtime-chain.json \
        ${RT_TUNE:+--tune-chained --write-configs} \
        --md $WORK/runtime-chain.md" ;;
    runtime-eager)  # the runtime's decode without CUDA graphs (each step's launches from the host), the linears'
      # replays on and off (a b b a), W4A16 and W8A8C8 at batch 1, after the usual rows (RT_LAYERS of Llama-3-8B)
      RUN_LIMIT=${RT_LIMIT:-300} run runtime-eager python benchmarks/runtime.py --eager-replay-ab \
        --skip hf,monitor,mixed,att,bf16 --layers ${RT_LAYERS:-16} --gen-len ${RT_GEN:-48} \
        --json $WORK/runtime-eager.json --md $WORK/runtime-eager.md ;;
    w4-decode)  # W4A16 M = 1 / 16 against tinygemm and GemLite (W4_DECODE_MS: the Ms)
      run w4-decode python benchmarks/gemm.py --peers --tune-decode --tune-decode-kinds w4a16 --ms "${W4_DECODE_MS:-1,16}" \
        --shapes $SHAPES --gemlite "$GEMLITE" --write-configs ;;
    w8-decode)  # W8A8 M = 1 / 16 against GemLite (PDL twins)
      run w8-decode python benchmarks/gemm.py --peers --tune-decode --tune-decode-kinds w8a8 --ms 1,16 \
        --shapes $SHAPES --gemlite "$GEMLITE" --write-configs ;;
    eager)  # the EAGER configs: W4A16 M = 1 and W8A8 M <= 16 entries taking two launches get the one-launch form
      # that calls outside a CUDA graph run where it costs > 5% less there (the larger of eager and host time;
      # EAGER_MS: the Ms; the table after it times every peer at those Ms on the entries as written)
      run eager python benchmarks/gemm.py --peers --tune-eager --ms "${EAGER_MS:-1,16}" --shapes $SHAPES \
        --gemlite "$GEMLITE" --write-configs --md "$WORK/eager.md" --json "$WORK/eager.json" ;;
    peers)  # the status table: every kernel against every peer on the configs as shipped, no search, the kernels
      # of a format timed interleaved, host times and our calls' host profiles at M <= 256 (PEER_MS: the Ms)
      run peers python benchmarks/gemm.py --peers --host-profile --ms "${PEER_MS:-1,16,64,256,2048}" --shapes $SHAPES \
        --gemlite "$GEMLITE" --md "$WORK/peers.md" --json "$WORK/peers.json" ;;
    w4-256)  # W4A16 M = 64-256 >= 0.9x cuBLAS: the Gluon W4 kernels
      W4_MS=${W4_MS:-64,128,256}
      run w4-256 python benchmarks/gemm.py --tune --tune-spec "w4a16:$W4_MS" --ms "$W4_MS" --shapes $SHAPES \
        --tune-rank graph --write-configs --md "$WORK/w4-256.md" ;;
  esac
done
pack; cat "$WORK/stages.txt"
