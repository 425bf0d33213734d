#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-perplexity, llama-quantize, llama-imatrix, llama-cli, llama-server)
# from the exact source that the installed llama-cpp-python vendors, so scripts/bench_gguf.py scores and quantizes
# with the same llama.cpp that llmq's tests load files with; tests/test_readme.py runs the README's llama-cli line
# with LLMQ_LLAMACPP_BIN=DEST/build/bin (llama-cli is built with the server in this llama.cpp). Takes ~12 minutes
# on 2 cores without the server, more with it.
#
#   scripts/build_llamacpp.sh [DEST]        # default DEST: bench_out/llama.cpp; tools land in DEST/build/bin
set -euo pipefail

DEST=${1:-bench_out/llama.cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$(python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

if [ ! -d "$DEST/src" ]; then
    download=$(mktemp -d)
    trap 'rm -rf "$download"' EXIT
    python -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$download" -q
    mkdir -p "$DEST/src.partial"
    tar xzf "$download"/llama_cpp_python-*.tar.gz -C "$DEST/src.partial" --strip-components=1
    mv "$DEST/src.partial" "$DEST/src"  # only a complete unpack gets the final name
fi

cmake -S "$DEST/src/vendor/llama.cpp" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON > "$DEST/cmake.log"
cmake --build "$DEST/build" -j "$(nproc)" --target llama-perplexity llama-quantize llama-imatrix llama-cli llama-server
echo "llama.cpp tools from llama-cpp-python $VERSION: $DEST/build/bin"
