#!/usr/bin/env bash
# The device checks of issue 17 in one prepared run on a lent GPU machine (its image has torch,
# transformers, xarray, numba and triton; zarr, numcodecs and dask travel as wheels).
#
# Here, before any device time (needs only package-registry access):
#     bash benchmarks/gpu_session.sh --wheels          # downloads them into .whl (11 MB, git-ignored)
# Then, through the device tool, stages in the order given (each under its own timeout):
#     run(command="bash benchmarks/gpu_session.sh tests profile qwen", carry=[".whl"], timeout_s=590)
#     run(command="bash benchmarks/gpu_session.sh minitron", carry=[".whl"], timeout_s=590)
# Stages: tests (CUDA tests, ~2 min with the first compilation), profile (one statistics block,
# fused against torch, ~1 min), qwen (the Qwen2.5-1.5B-shaped capture benchmark, bfloat16,
# 64 x ~100 tokens, ~5 min), minitron (an 8.4B Mistral-NeMo-Minitron-shaped pair, all statistics
# under --max-memory 24GB, peak against the plan; two 16.8 GB checkpoints, ~5 min).
# Everything is written under $OUT, which comes back.
set -u
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
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels missing: run bash benchmarks/gpu_session.sh --wheels here first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
for stage in "$@"; do
    echo "== $stage $(date +%T)"
    case $stage in
        tests) timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
                   tests/capture/test_cuda.py tests/capture/test_transfer.py 2>&1 | tee "$OUT/tests.log" ;;
        profile) timeout 120 python3 benchmarks/profile_lens.py --device cuda 2>&1 | tee "$OUT/profile_lens.log" ;;
        qwen) timeout 420 python3 benchmarks/capture.py --shape qwen1.5b --prompts 64x100 --device cuda \
                  --dtype bfloat16 --repeat 1 --out "$OUT/capture_qwen1.5b.json" 2>&1 | tail -40 ;;
        minitron) timeout 540 python3 benchmarks/capture_memory.py --shapes minitron8b --device cuda \
                      --dtype bfloat16 --lens on --max-memory 24GB --models-dir /tmp/resdiff-models 2>&1 \
                      | tee "$OUT/capture_memory_minitron8b.log" | tail -30 ;;
        *) echo "unknown stage $stage (tests, profile, qwen, minitron)"; exit 2 ;;
    esac
done
echo "== done $(date +%T)"
