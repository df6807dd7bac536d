#!/usr/bin/env bash
# The GPU measurements of issue #13 in one run, most important first, each under its own time limit
# and all under BUDGET_S seconds; full logs in $OUT (default /tmp/gpu-checks), a summary at the end.
#
#   BUDGET_S=420 bash hierdino/bench/gpu_checks.sh
#   ONLY="device run224" RUN_ARGS=--no-dashboard bash hierdino/bench/gpu_checks.sh   # some checks; a minimal Ray
#
# 1. bench.device: host syncs in a step between log steps; nvJPEG decode rate vs the CPU path per core
# 2. the crop-statistics test of data.decode=device, on the GPU (nvJPEG) as well as the CPU
# 3. bench.step --config vits14 --batch 64: full/bare, MFU, per-part breakdown
# 4. a 224 px Ray Train run (vits14, synthetic suite at 224 px, 40 steps): time to first batch
# 5. bench.step --config vitl14 --batch 64: MFU
# 6. the same 224 px run with data.decode=device
# 7. bench.step --config vits14 with train.compile=true
set -u
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
END=$(( $(date +%s) + ${BUDGET_S:-420} ))
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

check() {  # check NAME SECONDS CMD... : run CMD with at most SECONDS (and what is left of the budget)
    local name=$1 limit=$2
    shift 2
    [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && return
    local left=$(( END - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then
        echo "--- $name: skipped (budget spent)" | tee -a "$SUMMARY"
        return
    fi
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "--- $name: rc $rc, $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$SUMMARY"
}

nvidia-smi -L | tee -a "$SUMMARY"
RUN=(jobs/pretrain.py --config vits14 --set train.steps=40 --set eval.at_end=false
     --set data.synth_cache=/tmp/synth224 --set checkpoint.every_steps=1000 ${RUN_ARGS:-})

check device 100 $PY -m hierdino.bench.device --config vits14 --batch 32
check decode-test 90 $PY -m pytest -q -p no:cacheprovider tests/test_data_plane.py -k device_decode
check step-vits14 120 $PY -m hierdino.bench.step --config vits14 --batch 64 --steps 10 --no-ray
check run224 200 $PY "${RUN[@]}" --set run.storage=/tmp/runs-cpu
check step-vitl14 150 $PY -m hierdino.bench.step --config vitl14 --batch 64 --steps 10 --no-ray
check run224-device 150 $PY "${RUN[@]}" --set run.storage=/tmp/runs-dev --set data.decode=device
check step-vits14-compile 180 $PY -m hierdino.bench.step --config vits14 --batch 64 --steps 10 --no-ray \
    --set train.compile=true

{
    echo "=== device";  grep -E "^device|host syncs|^    |decode \+" "$OUT/device.log"
    echo "=== decode-test"; tail -n 3 "$OUT/decode-test.log"
    for s in step-vits14 step-vitl14 step-vits14-compile; do
        [ -f "$OUT/$s.log" ] && { echo "=== $s"; grep -vE "^\s+[0-9.]+ ms  " "$OUT/$s.log" | tail -n 16; }
    done
    for r in run224 run224-device; do
        [ -f "$OUT/$r.log" ] && { echo "=== $r"; grep -E "first batch|step (10|20|30|40)/40|finished|Error|error" "$OUT/$r.log" | tail -n 8; }
    done
} >> "$SUMMARY" 2>&1
cat "$SUMMARY"
