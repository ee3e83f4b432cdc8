#!/usr/bin/env bash
# Set up a virtual environment with edgellm and everything its tests need.
# llama-cpp-python is a source build (minutes on 2 cores): its wheel is cached under the
# user cache dir, keyed by every input that changes the binary (version, CMake flags,
# Python, compiler, CPU flags for the native build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-test}  # empty: the runtime alone (no torch), as a device would install it
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:-"-DLLAVA_BUILD=OFF -DGGML_RPC=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"}
# CPUs with AMX (Sapphire Rapids and later): GGML_NATIVE's -march=native turns on llama.cpp's AMX int8
# matmul, which segfaulted on the first decode of every model on this VM kind (llama.cpp 0.3.36,
# ggml_backend_amx_mul_mat). -mno-amx-int8 wins over -march=native in GCC whatever the order.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi

# edgellm deploy's tests: Debian's aarch64 cross toolchain (the Pi runtime) and an emulated arm64
# board (debootstrap + qemu-user-static + proot). Installed only when something is missing.
DEPLOY_APT="cmake binutils gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static proot debootstrap"
if command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  missing=""
  for p in $DEPLOY_APT; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "installing$missing (apt) ..." >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
  fi
fi

# --- chat page tests (tests/test_web.py) -------------------------------------------------------
# Debian's chromium, driven headless by Playwright's Python package (its executable_path; Playwright's
# own browser download is never used). Only for the test extras, only when missing.
if [[ "$EXTRAS" == *test* ]] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "ok installed"; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "installing chromium (apt, for the chat page's browser tests) ..." >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  fi
fi
# --- end chat page tests --------------------------------------------------------------------------

# --- mobile packaging tests (tests/test_package_android.py, tests/test_package_ios.py) ------------------
# Debian's Android build tools (the SDK's own cannot be downloaded here), clang/lld for Android's ABIs,
# a JDK (apksigner, smali, keytool, the host JVM test), enjarify (dex -> JVM bytecode), npm (the pinned
# onnxruntime / llama.cpp mobile binaries). Only for the test extras, only when missing.
MOBILE_APT="aapt zipalign apksigner android-framework-res libsmali-java dexdump enjarify clang-14 lld-14 llvm-14 openjdk-17-jdk-headless cmake"
if [[ "$EXTRAS" == *test* ]] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  missing=""
  for p in $MOBILE_APT; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  # npm only when no npm is on PATH: a machine whose Node.js comes from NodeSource has npm inside its
  # nodejs package, and Debian's npm package conflicts with that nodejs ("held broken packages")
  command -v npm >/dev/null || missing="$missing npm"
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "installing$missing (apt, for the mobile packaging tests) ..." >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
  fi
fi
# --- end mobile packaging tests (the npm binaries and llama.cpp's host build are fetched/built below) ---

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel >/dev/null

cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || sysctl -n machdep.cpu.features 2>/dev/null || echo none)
key_src="$LLAMA_CPP_PYTHON_VERSION|$LLAMA_CMAKE_ARGS|$("$VENV/bin/python" -c 'import sys,platform;print(sys.version_info[:2],platform.machine())')|$(cc --version 2>/dev/null | head -1)|$cpu_flags"
key=$(printf '%s' "$key_src" | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgellm/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$key"
if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (cached afterwards in $cache) ..." >&2
  rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/python" -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -w "$cache.tmp"
  rm -rf "$cache" && mv "$cache.tmp" "$cache"
fi
# pip skips a wheel of the version already installed: reinstall when the venv holds another build
if [ "$(cat "$VENV/.llama-build-key" 2>/dev/null)" != "$key" ]; then
  "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$cache"/llama_cpp_python-*.whl
  echo "$key" > "$VENV/.llama-build-key"
fi
"$VENV/bin/python" -m pip install -q "$cache"/llama_cpp_python-*.whl
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"

# --- mobile packaging: the pinned npm runtimes (version + sha256 checked, ~180 MB extracted) and the host
# build of the llama.cpp version the apps ship (minutes on 2 cores), both cached under the user cache dir
# and keyed by version, so a CI run pays for them once per machine
if [[ "$EXTRAS" == *test* ]] && command -v npm >/dev/null && command -v cmake >/dev/null; then
  "$VENV/bin/python" -c "from edgellm.package import hostbuild, natives
for p in natives.PACKAGES.values(): natives.fetch(p)
hostbuild.host_llama()"
fi
# --- end mobile packaging ---
