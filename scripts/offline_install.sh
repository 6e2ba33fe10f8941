#!/usr/bin/env bash
# scripts/offline_install.sh: installs the package on a machine that reaches no package index,
# from the kit scripts/gpu_kit.sh made: the kit's wheels, then the package itself, built against
# the kit's llama.cpp without build isolation (CMake, ninja, scikit-build-core and the wheels'
# other needs, numpy, jinja2, pyyaml, requests, tqdm, typing-extensions, must be installed).
#
# Usage, from the repository root: bash scripts/offline_install.sh BUILD_DIR [CMAKE_ARG...]
#   e.g. bash scripts/offline_install.sh build/cuda -DGGML_CUDA=ON -DLOGQUANT_CUDA=ON
# Env: LOGQUANT_KIT (default .gpu-kit)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${LOGQUANT_KIT:-.gpu-kit}
BUILD=${1:?usage: $0 BUILD_DIR [CMAKE_ARG...]}
shift
[ -f "$KIT/llama.cpp.tar.xz" ] || { echo "no $KIT/llama.cpp.tar.xz: run scripts/gpu_kit.sh where there is network" >&2; exit 2; }
SRC=$(mktemp -d)
tar xJf "$KIT/llama.cpp.tar.xz" -C "$SRC"
export LOGQUANT_LLAMA_CPP_SOURCE="$SRC/llama.cpp"
python3 -m pip install -q --no-index --find-links "$KIT/wheels" "$KIT"/wheels/*.whl
CMAKE_ARGS="-DLLAMA_BUILD=OFF $*" python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    -C build-dir="$BUILD" .
