#!/usr/bin/env bash
# The GPU measurements of issue #39 (part 3) in one unattended run, most important first, each under its own
# time limit and all under BUDGET_S seconds (default 540: one 600 s device command); full logs in $OUT (default
# /tmp/gpu-checks), a summary at the end. Name the device (nvidia-smi -L, first line of the summary) with the figures.
#
#   BUDGET_S=540 bash hierdino/bench/gpu_checks.sh
#   ONLY="step-vits14 run224-device" bash hierdino/bench/gpu_checks.sh      # some checks (two calls: split the list)
#   ONLY="step-vitl14 ingest device decode-test" bash hierdino/bench/gpu_checks.sh
#
# 1. step-vits14: bench.step --config vits14 --batch 64: eager, whole step compiled, compiled + CUDA graphs, side by
#    side as ratios to the eager step and to the bare backbone step (goal: full/bare <= 1.8x); MFU of each; the
#    first compile's time ("train.compile ... compiled in")
# 2. run224-device: a 224 px Ray Train run (vits14, synthetic suite at 224 px) with data.decode=device, 100 steps:
#    rc 0 = no non-finite step (train.skip_nonfinite_steps=0 stops at the first); its first batch (goal <= 15 s) and
#    data-wait from the progress lines
# 3. step-vitl14: bench.step --config vitl14 --batch 64: MFU eager and compiled (goal >= 40% of the measured bf16
#    matmul peak, printed on the same line)
# 4. ingest: bench.ingest at 224 px (2 global + 8 local crops of 96 px): the CPU cores one GPU needs, CPU decode
#    against device decode (what is left on the CPU: header parse and crop plan), at ViT-S's ~500 images/s
# 5. device: bench.device: host syncs of a step between log steps; nvJPEG decode rate against the CPU path per core
# 6. decode-test: the crop-statistics test of data.decode=device, on the GPU (nvJPEG)
# The checks run in this order; ONLY picks some of them, it does not reorder them.
set -u
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
END=$(( $(date +%s) + ${BUDGET_S:-540} ))
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
rm -rf /tmp/runs-dev  # a rerun on a warm machine would resume the finished run and time nothing

STEP=($PY -m hierdino.bench.step --batch 64 --steps 20 --no-ray)
check step-vits14 300 "${STEP[@]}" --config vits14
check run224-device 200 $PY jobs/pretrain.py --config vits14 --no-eval --set train.steps=100 --set train.log_every=10 \
    --set eval.at_end=false --set data.synth_cache=/tmp/synth224 --set checkpoint.every_steps=1000 \
    --set run.storage=/tmp/runs-dev --set data.decode=device ${RUN_ARGS:-}
check step-vitl14 300 "${STEP[@]}" --config vitl14
check ingest 150 $PY -m hierdino.bench.ingest --images 600 --image-size 224 --local-crops 8 --local-size 96 --no-s3 \
    --gpu-images-per-s 500
check device 100 $PY -m hierdino.bench.device --config vits14 --batch 32
check decode-test 60 $PY -m pytest -q -p no:cacheprovider tests/test_data_plane.py -k device_decode

{
    for s in step-vits14 step-vitl14; do
        [ -f "$OUT/$s.log" ] && { echo "=== $s"; grep -E "^vit|^[a-z0-9-]+ \(|bare step|full step|MFU|compiled in|Error" "$OUT/$s.log" | grep -v "^    " | head -n 14; }
    done
    [ -f "$OUT/run224-device.log" ] && { echo "=== run224-device"; grep -E "first batch|data.wait|wait|step (10|50|100)/100|skipped|non-finite|finished|Error" "$OUT/run224-device.log" | tail -n 10; }
    [ -f "$OUT/ingest.log" ] && { echo "=== ingest"; tail -n 8 "$OUT/ingest.log"; }
    [ -f "$OUT/device.log" ] && { echo "=== device"; grep -E "^device|host syncs|^    |decode \+|cores" "$OUT/device.log"; }
    [ -f "$OUT/decode-test.log" ] && { echo "=== decode-test"; tail -n 3 "$OUT/decode-test.log"; }
} >> "$SUMMARY" 2>&1
cat "$SUMMARY"
