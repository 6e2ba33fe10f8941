#!/usr/bin/env bash
# The saved-state fuzzer (scripts/fuzz_state.py) under AddressSanitizer (+ UBSan).
#
# Builds the patched llama.cpp libraries (llama, ggml) with our native/ code, instrumented, in a
# build folder of their own (default dev/asan-build, git-ignored; the normal build is untouched),
# installs them into a scratch copy of the package (<build>/pkg/logquant_gguf), and runs the fuzzer
# with that package first on sys.path and libasan preloaded (Python itself is not instrumented).
# A memory error aborts the worker process; the fuzzer records the mutation that triggered it and
# goes on with a fresh worker. Results: <out>/asan.json (the fuzzer's JSON), <out>/asan-summary.txt
# (counts, and the first lines of each sanitizer report), <out>/asan-log.txt (the full stderr).
#
#   scripts/asan_fuzz.sh [build|run|all] [fuzz_state.py options...]     (default: all)
#
# Environment: ASAN_BUILD_DIR (dev/asan-build), PYTHON (.venv/bin/python), JOBS (2),
# SANITIZERS (address,undefined), FUZZ_OUT (bench/results/fuzz), LOGQUANT_LLAMA_CPP_SOURCE (the
# pinned llama-cpp-python sdist; default: the one the normal build downloaded, else the download
# cache, else cmake downloads it). The build runs under `nice -n 10`: incremental after the first
# (about an hour on 2 shared cores), so a native fix costs a recompile of the files it touches.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${ASAN_BUILD_DIR:-$REPO/dev/asan-build}
PY=${PYTHON:-$REPO/.venv/bin/python}
JOBS=${JOBS:-2}
SANITIZERS=${SANITIZERS:-address,undefined}
OUT=${FUZZ_OUT:-$REPO/bench/results/fuzz}
PKG=$BUILD/pkg

step=all
case "${1:-}" in
    build|run|all) step=$1; shift ;;
esac

find_sdist() {
    if [[ -n "${LOGQUANT_LLAMA_CPP_SOURCE:-}" ]]; then
        echo "$LOGQUANT_LLAMA_CPP_SOURCE"; return
    fi
    local name=llama_cpp_python-0.3.36.tar.gz
    for f in "$REPO/build/py3-none-linux_x86_64/_download/$name" \
             "${XDG_CACHE_HOME:-$HOME/.cache}/logquant-gguf/$name"; do
        if [[ -f "$f" ]]; then echo "$f"; return; fi
    done
    echo ""  # cmake downloads it (scripts/llama_source.py)
}

# CMakeLists.txt keeps the patched llama.cpp in <build>/llama.cpp, which is also that subproject's
# binary dir; when the patch series changes, scripts/llama_source.py re-materializes it and deletes
# every file the fresh tree lacks, object files included: a full rebuild (an hour here). So this
# script brings an existing tree up to date itself, rewriting only the files that differ, and
# stamps it: the configure step then finds it current.
refresh_tree() {
    local tree=$BUILD/cmake/llama.cpp
    [[ -d "$tree" ]] || return 0
    local want have
    want=$("$PY" "$REPO/scripts/llama_source.py" digest)
    have=$(cat "$tree/.logquant-series" 2>/dev/null || true)
    [[ "$want" != "$have" ]] || return 0
    echo "== the patch series changed: updating the files it changes in $tree"
    rm -rf "$BUILD/fresh"
    LOGQUANT_LLAMA_CPP_SOURCE="$1" "$PY" "$REPO/scripts/llama_source.py" materialize \
        "$BUILD/fresh/llama.cpp" --cache "$BUILD/_download"
    "$PY" - "$BUILD/fresh/llama.cpp" "$tree" <<'PYEOF'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
n = 0
for a in src.rglob("*"):
    if a.is_dir() or a.name == ".logquant-series":
        continue
    b = dst / a.relative_to(src)
    if b.is_file() and not a.is_symlink() and b.read_bytes() == a.read_bytes():
        continue
    b.parent.mkdir(parents=True, exist_ok=True)
    if b.exists() or b.is_symlink():
        b.unlink()
    shutil.copy2(a, b, follow_symlinks=False)
    n += 1
shutil.copy2(src / ".logquant-series", dst / ".logquant-series")
print(f"   {n} files updated")
PYEOF
    rm -rf "$BUILD/fresh"
}

do_build() {
    local san="-fsanitize=$SANITIZERS -fno-omit-frame-pointer -fno-sanitize-recover=address"
    # -O1: a usable speed for the fuzzer at half the compile time of -O3; -g for the reports
    local opt="-O1 -g -DNDEBUG"
    local src
    src=$(find_sdist)
    mkdir -p "$BUILD"
    refresh_tree "$src"
    echo "== configure ($BUILD/cmake, sanitizers: $SANITIZERS, source: ${src:-download})"
    LOGQUANT_LLAMA_CPP_SOURCE="$src" cmake -S "$REPO" -B "$BUILD/cmake" -G Ninja \
        -DPython3_EXECUTABLE="$PY" \
        -DLOGQUANT_LLAMA_CPP_SOURCE="$src" \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_C_FLAGS="$san" -DCMAKE_CXX_FLAGS="$san" \
        -DCMAKE_C_FLAGS_RELWITHDEBINFO="$opt" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$opt" \
        -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=$SANITIZERS" \
        -DGGML_NATIVE=ON -DLOGQUANT_BUILD_TOOLS=OFF >"$BUILD/configure.log" 2>&1 \
        || { tail -40 "$BUILD/configure.log"; exit 1; }
    echo "== build (nice -n 10, -j$JOBS)"
    # -k 0: on an error, build the rest anyway (the next run then recompiles only what failed)
    nice -n 10 cmake --build "$BUILD/cmake" -j "$JOBS" -- -k 0
    echo "== install into the scratch package $PKG"
    rm -rf "$PKG"
    mkdir -p "$PKG"
    # the package's Python code as it is in the tree now, without its normal native libs
    (cd "$REPO" && tar cf - --exclude=__pycache__ --exclude=logquant_gguf/lib --exclude=logquant_gguf/bin \
        logquant_gguf) | (cd "$PKG" && tar xf -)
    cmake --install "$BUILD/cmake" --prefix "$PKG" >/dev/null
    ls "$PKG/logquant_gguf/lib"
}

do_run() {
    [[ -f "$PKG/logquant_gguf/lib/libllama.so" ]] || { echo "no ASan build in $PKG: run '$0 build' first"; exit 1; }
    # the Python code may have changed since the build: refresh it (the libs stay)
    (cd "$REPO" && tar cf - --exclude=__pycache__ --exclude=logquant_gguf/lib --exclude=logquant_gguf/bin \
        logquant_gguf) | (cd "$PKG" && tar xf -)
    mkdir -p "$OUT"
    local libasan
    libasan=$(gcc -print-file-name=libasan.so)
    # libstdc++ too: python is not linked to it, and without it ASan cannot resolve the real
    # __cxa_throw ("CHECK failed: real___cxa_throw != 0" at the first C++ exception)
    local stdcxx
    stdcxx=$(g++ -print-file-name=libstdc++.so.6)
    local log=$OUT/asan-log.txt
    rm -f "$log" "$log.gz"
    echo "== fuzz under ASan (preload $libasan); stderr of the workers -> $log"
    set +e
    PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" \
    LD_PRELOAD="$libasan $stdcxx" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:handle_abort=1:symbolize=1:print_summary=1" \
    GGML_NO_BACKTRACE=1 \
    UBSAN_OPTIONS="print_stacktrace=1" \
        "$PY" "$REPO/scripts/fuzz_state.py" --package-root "$PKG" --expect-lib "$PKG/logquant_gguf/lib" \
              --out "$OUT/asan.json" --worker-log "$log" "$@"
    local rc=$?
    set -e
    {
        echo "ASan fuzz run: $(date -u +%Y-%m-%dT%H:%M:%SZ), sanitizers $SANITIZERS, fuzz_state.py $*"
        echo "fuzz_state.py exit status: $rc"
        "$PY" - "$OUT/asan.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:  # the fuzzer died before writing it
    print(f"no result file: {e}")
    sys.exit(0)
print("summary:", json.dumps(r.get("summary", {})))
for c in r.get("crashes", [])[:20]:
    print("crash:", json.dumps({k: c.get(k) for k in ("index", "scenario", "mutation", "signal", "report")})[:2000])
EOF
        echo
        echo "sanitizer reports in the log:"
        grep -c "ERROR: AddressSanitizer" "$log" 2>/dev/null | sed 's/^/  AddressSanitizer errors: /' || true
        grep -c "runtime error:" "$log" 2>/dev/null | sed 's/^/  UBSan runtime errors: /' || true
        grep -E "ERROR: AddressSanitizer|SUMMARY: (AddressSanitizer|UndefinedBehaviorSanitizer)|runtime error:" "$log" \
            2>/dev/null | sort | uniq -c | sort -rn | head -40 || true
    } | tee "$OUT/asan-summary.txt"
    # the full log only when small (a run with many crashes writes megabytes of stacks)
    if [[ $(stat -c %s "$log") -gt 2000000 ]]; then gzip -f "$log"; fi
    return $rc
}

case "$step" in
    build) do_build ;;
    run) do_run "$@" ;;
    all) do_build; do_run "$@" ;;
esac
