#!/usr/bin/env bash
# llama.cpp's CLI tools and server, built offline from the llama.cpp tree vendored in the llama-cpp-python
# source distribution, for the llama.cpp rows of the benchmarks (the CPU peer on the same GGUF files).
# Idempotent: a build whose llama-bench runs is left as it is. About 9 minutes on 2 cores.
# Location: $SPECD_LLAMACPP_DIR, default ~/.cache/specd/llama.cpp (binaries in its build/bin).
set -euo pipefail

DIR="${SPECD_LLAMACPP_DIR:-$HOME/.cache/specd/llama.cpp}"
PYTHON="${PYTHON:-python3}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TOOLS=(llama-cli llama-bench llama-server llama-speculative llama-speculative-simple llama-lookup)

if [ -x "$DIR/build/bin/llama-bench" ] && "$DIR/build/bin/llama-bench" --help >/dev/null 2>&1; then
  echo "llama.cpp already built in $DIR/build/bin"
  exit 0
fi
for tool in cmake gcc g++; do
  command -v "$tool" >/dev/null || { echo "setup_llamacpp: $tool is missing; skipping llama.cpp" >&2; exit 0; }
done

mkdir -p "$DIR"
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
if ! "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$download" "llama-cpp-python==${VERSION}"; then
  echo "setup_llamacpp: could not download the llama-cpp-python ${VERSION} source; skipping llama.cpp" >&2
  exit 0
fi
tar -xzf "$download"/llama_cpp_python-*.tar.gz -C "$download"
rm -rf "$DIR/src"
mv "$download"/llama_cpp_python-*/vendor/llama.cpp "$DIR/src"

# The web UI would be downloaded; tests are not needed. GGML_NATIVE: this CPU's instruction set, as specd's kernel.
cmake -S "$DIR/src" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF >/dev/null
cmake --build "$DIR/build" -j "$(nproc)" --target "${TOOLS[@]}"
"$DIR/build/bin/llama-bench" --help >/dev/null
echo "llama.cpp built in $DIR/build/bin"
