#!/usr/bin/env bash
# The GPU measurements of issue #13 in one run, most important first, each under its own time limit
# and all under BUDGET_S seconds; full logs in $OUT (default /tmp/gpu-checks), a summary at the end.
#
#   BUDGET_S=420 bash hierdino/bench/gpu_checks.sh
#   ONLY="device run224" RUN_ARGS=--no-dashboard bash hierdino/bench/gpu_checks.sh   # some checks; a minimal Ray
#
# 1. bench.step --config vits14 --batch 64: full/bare, FLOP ratio, MFU, ATen ops, per-part breakdown, GPU busy time
# 2. the same with train.compile=true (compiled blocks, teacher targets and losses: fewer kernel launches and
#    fewer passes over the [rows, 65,536] prototype logits, the top device time of the eager ViT-S step)
# 3. the same under FSDP2 on one rank (bf16 parameters, as each GPU of a multi-GPU run) instead of autocast
# 4. bench.step --config vitl14 --batch 64: MFU
# 5. the same under FSDP2 on one rank
# 6. a 224 px Ray Train run (vits14, synthetic suite at 224 px, 20 steps): time to first batch
# 7. the same 224 px run with data.decode=device
# 8. bench.device: host syncs in a step between log steps; nvJPEG decode rate vs the CPU path per core
# 9. the crop-statistics test of data.decode=device, on the GPU (nvJPEG) as well as the CPU
# The checks run in this order; ONLY picks some of them, it does not reorder them.
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
    timeout -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1  # -k: a driver that handles SIGTERM (a checkpoint first) is killed 20 s on
    local rc=$?
    echo "--- $name: rc $rc, $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$SUMMARY"
}

nvidia-smi -L | tee -a "$SUMMARY"
rm -rf /tmp/runs-cpu /tmp/runs-dev  # a rerun on a warm machine would resume the finished runs and time nothing
RUN=(jobs/pretrain.py --config vits14 --set train.steps=20 --set eval.at_end=false
     --set data.synth_cache=/tmp/synth224 --set checkpoint.every_steps=1000 ${RUN_ARGS:-})

STEP=($PY -m hierdino.bench.step --batch 64 --steps 10 --no-ray)
check step-vits14 120 "${STEP[@]}" --config vits14
check step-vits14-compile 240 "${STEP[@]}" --config vits14 --set train.compile=true
check step-vits14-fsdp 120 "${STEP[@]}" --config vits14 --fsdp
check step-vitl14 150 "${STEP[@]}" --config vitl14
check step-vitl14-fsdp 150 "${STEP[@]}" --config vitl14 --fsdp
check run224 120 $PY "${RUN[@]}" --set run.storage=/tmp/runs-cpu
check run224-device 120 $PY "${RUN[@]}" --set run.storage=/tmp/runs-dev --set data.decode=device
check device 100 $PY -m hierdino.bench.device --config vits14 --batch 32
check decode-test 60 $PY -m pytest -q -p no:cacheprovider tests/test_data_plane.py -k device_decode

{
    echo "=== device";  grep -E "^device|host syncs|^    |decode \+" "$OUT/device.log"
    echo "=== decode-test"; tail -n 3 "$OUT/decode-test.log"
    for s in step-vits14 step-vits14-compile step-vits14-fsdp step-vitl14 step-vitl14-fsdp; do
        [ -f "$OUT/$s.log" ] && { echo "=== $s"; grep -vE "^\s+[0-9.]+ ms  " "$OUT/$s.log" | tail -n 18; }
    done
    for r in run224 run224-device; do
        [ -f "$OUT/$r.log" ] && { echo "=== $r"; grep -E "first batch|step (10|20)/20|finished|Error|error" "$OUT/$r.log" | tail -n 8; }
    done
} >> "$SUMMARY" 2>&1
cat "$SUMMARY"
