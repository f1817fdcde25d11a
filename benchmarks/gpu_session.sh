#!/usr/bin/env bash
# The device checks in one call on a lent GPU machine, most valuable first, every stage's output written into
# $OUT as it goes (what a cut-short call leaves is what came back).
#
# 1. Here, once, before any device time (package-registry access only): the wheels the GPU image lacks,
#        bash benchmarks/gpu_session.sh --wheels            # into .whl (about 11 MB, git-ignored)
# 2. Here, to know the script works before a GPU is lent (every stage at toy scale on the CPU, < 5 minutes,
#    the same files under $OUT):
#        OUT=/tmp/rehearsal bash benchmarks/gpu_session.sh --cpu-rehearsal
# 3. On the device, one call (stage timeouts add up to at most 540 s; the 8B stage runs only in the time left):
#        run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# Stages, in order:
#   tests     the CUDA tests (transfer, compiled statistics, masks)                          -> tests.log
#   syncs     a capture's pass loop under torch.cuda.set_sync_debug_mode("warn"): every host sync, by line
#                                                                                             -> syncs.json, syncs.log
#   profile   one statistics block, fused against plain torch                                 -> profile_lens.log
#   qwen      the Qwen2.5-1.5B-shaped capture benchmark, bfloat16, 64 x ~100 tokens          -> capture_qwen1.5b.json, .log
#   minitron  the Mistral-NeMo-Minitron-8B-shaped pair under --max-memory 24GB, peak against the plan, if at
#             least 150 s are left                                                            -> capture_memory_minitron8b.log
set -u
BUDGET=540
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
if [ "${1:-}" = "--wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d .whl zarr==3.1.6 numcodecs==0.16.6 dask==2026.8.0 donfig google-crc32c partd locket
fi
OUT=${OUT:-/tmp/resdiff-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--cpu-rehearsal" ]; then
    DEVICE=cpu; DTYPE=float32; BIG=toy; HUGE=toy; PROFILE="--vocab 8192 --hidden 128"
    PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    export PYTHONPATH=$PWD
    echo "CPU rehearsal: $(nproc) cores" | tee "$OUT/gpu.txt"
else
    DEVICE=cuda; DTYPE=bfloat16; BIG=qwen1.5b; HUGE=minitron8b; PROFILE=""
    PY=python3
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheels missing: run bash benchmarks/gpu_session.sh --wheels here first" | tee "$OUT/gpu.txt"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
START=$(date +%s)
stage() {  # stage NAME SECONDS LOG COMMAND...: run under its timeout, output teed into $OUT/LOG as it goes
    local name=$1 limit=$2 log=$3; shift 3
    echo "== $name $(date +%T) (limit ${limit}s)" | tee -a "$OUT/stages.txt"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
    echo "== $name rc=${PIPESTATUS[0]} after $(( $(date +%s) - START ))s" | tee -a "$OUT/stages.txt"
}
stage tests 100 tests.log $PY -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/capture/test_cuda.py tests/capture/test_transfer.py tests/capture/test_masks.py
stage syncs 60 syncs.log $PY benchmarks/cuda_syncs.py --device $DEVICE --shape $BIG --dtype $DTYPE \
    --out "$OUT/syncs.json"
# shellcheck disable=SC2086
stage profile 60 profile_lens.log $PY benchmarks/profile_lens.py --device $DEVICE $PROFILE
stage qwen 200 capture_qwen1.5b.log $PY benchmarks/capture.py --shape $BIG --prompts 64x100 --device $DEVICE \
    --dtype $DTYPE --batch-size 64 --repeat 1 --out "$OUT/capture_qwen1.5b.json"
LEFT=$(( BUDGET - ($(date +%s) - START) ))
if [ "$LEFT" -ge 150 ]; then
    stage minitron "$LEFT" capture_memory_minitron8b.log $PY benchmarks/capture_memory.py --shapes $HUGE \
        --device $DEVICE --dtype $DTYPE --lens on --max-memory 24GB --models-dir /tmp/resdiff-models
else
    echo "== minitron skipped: ${LEFT}s left of ${BUDGET}s" | tee -a "$OUT/stages.txt"
fi
echo "== done $(date +%T), $(( $(date +%s) - START ))s" | tee -a "$OUT/stages.txt"
