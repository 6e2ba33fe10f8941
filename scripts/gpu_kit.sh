#!/usr/bin/env bash
# scripts/gpu_kit.sh: the luggage scripts/gpu_check.sh needs on a lent GPU machine, made here.
#
# A lent machine (docs/cuda.md) has CUDA, CMake, ninja, scikit-build-core, numpy, pytest and
# matplotlib, but reaches no package index, and a call carries at most 64 MiB. This writes
# .gpu-kit/ (ignored by git; name it in the call's `carry`), about 6 MiB:
#   llama.cpp.tar.xz  the pinned llama.cpp less what our build never reads (llama_source.py pack)
#   wheels/           what the package needs that such a machine lacks, for its Python 3.12:
#                     llama-cpp-python's Python code (built here with -DLLAMA_BUILD=OFF), cffi,
#                     pycparser, gguf (the tests' model writer), diskcache
# scripts/offline_install.sh installs from it; gpu_check.sh does that when .gpu-kit is there.
#
# Usage, from the repository root, with network: bash scripts/gpu_kit.sh
# Env: LOGQUANT_KIT (default .gpu-kit), KIT_PYTHON_VERSION (the target's Python, default 3.12),
#      PYTHON (the Python that builds the kit here, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${LOGQUANT_KIT:-.gpu-kit}
PY=${PYTHON:-python3}
rm -rf "$KIT"
mkdir -p "$KIT/wheels"
"$PY" scripts/llama_source.py pack "$KIT/llama.cpp.tar.xz"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${KIT_PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" "cffi>=1.15" pycparser "gguf>=0.10" diskcache
# the pinned sdist the build already fetched, else from the index
SDIST=$(ls build/*/_download/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1 || true)
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" \
    "${SDIST:-$("$PY" scripts/llama_source.py describe)}"
du -sh "$KIT"
ls "$KIT/wheels"
