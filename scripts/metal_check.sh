#!/usr/bin/env bash
# scripts/metal_check.sh: every check of the LogQuant Metal kernels, on a Mac with Apple silicon.
#
#   1. build: the package with -DGGML_METAL=ON -DLOGQUANT_METAL=ON and the tools;
#      LOGQUANT_SKIP_BUILD=1 takes what is installed
#   2. test-backend-ops for GGML_OP_LQ2_DEMOTE / _ATTN / _DEQUANT: every case, Metal against the CPU
#      (the demotion computes RoPE angles without double: its codes may differ where a value sits
#      on a rounding boundary, so its NMSE is small, not 0)
#   3. pytest -m metal: the cache in unified memory against the same model on the CPU
#   4. bench speed --device metal at 4k and 16k for f16, q8_0, q4_0 and logquant (one run)
# Everything runs with LOGQUANT_METAL=1: without it the Metal LogQuant ops say unsupported and a
# LogQuant cache stays on the CPU. Each step's output goes to bench/results/metal/ as well as to
# the terminal: commit that folder. The exit status is the number of failed steps.
#
# Usage, from the repository root with python3 (a venv) on PATH: bash scripts/metal_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/metal
mkdir -p "$OUT"
export LOGQUANT_METAL=1
. scripts/check_steps.sh

(sw_vers; sysctl -n machdep.cpu.brand_string; system_profiler SPDisplaysDataType 2>/dev/null | grep -E "Chipset|Metal") \
    > "$OUT/machine.txt" 2>&1 || true
cat "$OUT/machine.txt"

if [ "${LOGQUANT_SKIP_BUILD:-0}" != 1 ]; then
    step build env CMAKE_ARGS="-DLLAMA_BUILD=OFF -DGGML_METAL=ON -DLOGQUANT_METAL=ON -DLOGQUANT_BUILD_TOOLS=ON" \
        python3 -m pip install -q -C build-dir=build/metal ".[model,bench,test]"
fi
PKG=$(installed_package)

step test-backend-ops "$PKG/bin/test-backend-ops" test -b MTL0 -o LQ2_DEMOTE,LQ2_ATTN,LQ2_DEQUANT
step pytest-metal bash -c "cd /tmp && python3 -m pytest -q -m metal -rs '$PWD/tests/test_gpu.py'"
step bench-speed bash -c "cd /tmp && python3 -m logquant_gguf bench speed --device metal --depths 4096,16384 --kv-types f16,q8_0,q4_0,logquant --out '$PWD/bench/results'"

echo "metal_check: $failed step(s) failed; results in $OUT"
exit "$failed"
