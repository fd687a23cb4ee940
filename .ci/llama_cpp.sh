#!/usr/bin/env bash
# llama.cpp's Python bindings, for the tests that load exported GGUF files with the real client.
# PyPI ships llama-cpp-python as source only: the first build takes 10-15 minutes on 2 cores, so the wheel is
# kept in loratune's cache folder and later runs install it in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
PYTHON=${PYTHON:-.venv/bin/python}
# A native build (-march=native) dies with "Illegal instruction" on these CPUs; name the instruction sets instead.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
key=$(printf '%s' "$CMAKE_ARGS" | sha1sum | cut -c1-8)
wheels="${LORATUNE_CACHE:-$HOME/.cache/loratune}/wheels/llama-cpp-python-$VERSION-$key"

if [ "$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION from source (once; 10-15 minutes on 2 cores) into $wheels"
    mkdir -p "$(dirname "$wheels")"
    tmp=$(mktemp -d "$wheels.tmp-XXXXXX") && chmod 755 "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    start=$SECONDS
    "$PYTHON" -m pip wheel --quiet --no-deps --no-cache-dir "llama-cpp-python==$VERSION" -w "$tmp"
    mv "$tmp" "$wheels"  # whole or not at all: a failed build leaves no wheel to reuse
    echo "built in $((SECONDS - start)) s"
fi
# Its other dependencies (numpy, jinja2, typing-extensions) come with loratune.
"$PYTHON" -m pip install --quiet --no-deps "$wheels"/llama_cpp_python-"$VERSION"-*.whl "diskcache>=5.6.1,<6"
