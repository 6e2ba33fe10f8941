#!/usr/bin/env bash
# scripts/gpu_check.sh: every check of the LogQuant CUDA kernels, on a machine with an NVIDIA GPU.
#
#   1. build: the package with -DGGML_CUDA=ON -DLOGQUANT_CUDA=ON and the tools, for this GPU's
#      architecture only (minutes on 16 cores); LOGQUANT_SKIP_BUILD=1 takes what is installed
#   2. test-backend-ops for GGML_OP_LQ2_DEMOTE / _ATTN / _DEQUANT: every case, CUDA against the CPU
#      (demoted codes must be the CPU's bytes: NMSE 0)
#   3. pytest -m cuda: the cache in VRAM against the same model on the CPU, state round trip
#   4. bench speed --device cuda at 4k, 16k, 32k for f16, q8_0, q4_0, logquant and logquant+s8
#      (one run), on the default model, or where it is not installed on random weights with its shapes
#      (scripts/shaped_model.py: the model cannot travel to a lent machine)
# A lent machine reaches no package index: make the kit first (bash scripts/gpu_kit.sh, here),
# carry .gpu-kit, and the build installs from it (scripts/offline_install.sh).
# Each step's output goes to bench/results/cuda/ as well as to the terminal: commit that folder.
# A failing step does not stop the later ones; the exit status is the number of failed steps.
#
# Usage, from the repository root with python3 (a venv) on PATH: bash scripts/gpu_check.sh [build|checks]
#   build   step 1 only; checks: steps 2-4 only (a lent GPU machine allows 10 minutes a command:
#           the build of ggml-cuda may need one call of its own, its outputs stay for the next)
# Env: LOGQUANT_CUDA_ARCH (default native), LOGQUANT_SKIP_BUILD=1, GPU_CHECK_DEPTHS (4096,16384,32768)
set -uo pipefail
STAGE=${1:-all}
case "$STAGE" in all|build|checks) ;; *) echo "usage: $0 [build|checks]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT=bench/results/cuda
mkdir -p "$OUT"
. scripts/check_steps.sh

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$OUT/gpu.txt" 2>&1 || true
cat "$OUT/gpu.txt"

CUDA_ARGS="-DGGML_CUDA=ON -DLOGQUANT_CUDA=ON -DLOGQUANT_BUILD_TOOLS=ON -DCMAKE_CUDA_ARCHITECTURES=${LOGQUANT_CUDA_ARCH:-native}"
if [ "${LOGQUANT_SKIP_BUILD:-0}" != 1 ] && [ "$STAGE" != checks ]; then
    if [ -d .gpu-kit ]; then # a lent machine reaches no package index: the kit (scripts/gpu_kit.sh)
        step build bash scripts/offline_install.sh build/cuda $CUDA_ARGS
    else
        step build env CMAKE_ARGS="-DLLAMA_BUILD=OFF $CUDA_ARGS" \
            python3 -m pip install -q -C build-dir=build/cuda ".[model,bench,test]"
    fi
fi
if [ "$STAGE" = build ]; then
    echo "gpu_check: build done ($failed failed)"
    exit "$failed"
fi
PKG=$(installed_package)

step test-backend-ops "$PKG/bin/test-backend-ops" test -b CUDA0 -o LQ2_DEMOTE,LQ2_ATTN,LQ2_DEQUANT
step pytest-cuda bash -c "cd /tmp && python3 -m pytest -q -m cuda -rs '$PWD/tests/test_gpu.py'"
# the default model, else (it cannot travel to a lent machine) random weights with its shapes
MODEL=qwen2.5-coder-0.5b
if ! (cd /tmp && python3 -c 'from logquant_gguf import models; models.model_path()') > /dev/null 2>&1; then
    MODEL=/tmp/qwen2.5-coder-0.5b-shaped.gguf
    [ -f "$MODEL" ] || python3 scripts/shaped_model.py qwen2.5-coder-0.5b "$MODEL"
fi
step bench-speed bash -c "cd /tmp && python3 -m logquant_gguf bench speed --model '$MODEL' --device cuda --depths ${GPU_CHECK_DEPTHS:-4096,16384,32768} --kv-types f16,q8_0,q4_0,logquant,logquant+s8 --out '$PWD/bench/results'"

echo "gpu_check: $failed step(s) failed; results in $OUT"
exit "$failed"
