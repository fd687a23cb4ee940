#!/usr/bin/env bash
# Download the wheels the GPU benchmark needs beyond what the GPU machine's Python has (torch, transformers, peft,
# accelerate, safetensors, tokenizers, rich, PyYAML, matplotlib, pyarrow), for its Python version(s), into
# bench/wheels/ (or $WHEELS). Without dependencies: torch and the rest are there already.
#
#   bench/gpu_wheels.sh 3.12              # one Python version (python -V on the GPU machine)
#   bench/gpu_wheels.sh 3.11 3.12         # several, when the version is not known (pandas is ~12 MB each)
#   NO_BITSANDBYTES=1 bench/gpu_wheels.sh 3.12   # leave out bitsandbytes (~41 MiB): no 4-bit case or check
#
# Everything carried to the GPU machine, wheels and working tree, must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/gpu_wheels.sh PYTHON_VERSION... (e.g. 3.12)" >&2; exit 2; }
dir=${WHEELS:-bench/wheels}
pip=${PIP:-pip}
mkdir -p "$dir"
# Pure-Python wheels, the same for every version. Versions as tested on the CPU. The last three are there in case
# the machine's own are older than datasets and pydantic need; pip takes them only then.
common=(
  "pydantic==2.14.4" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "datasets==5.2.0" "dill==0.4.1" "tzdata"
  "trl==1.16.0" "liger-kernel==0.8.5"
  "typing-extensions==4.16.0" "fsspec==2026.9.0" "huggingface-hub>=1.31,<2"
)
[ -n "${NO_BITSANDBYTES:-}" ] || common+=("bitsandbytes==0.50.2")
# Compiled (or per-version) wheels.
per_version=("pydantic-core==2.50.5" "xxhash==4.1.0" "multiprocess==0.70.19" "pandas>=2.1.1,<4")
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
"$pip" download --quiet --no-deps --only-binary=:all: --python-version "$1" "${platforms[@]}" -d "$dir" "${common[@]}"
for version in "$@"; do
  "$pip" download --quiet --no-deps --only-binary=:all: --python-version "$version" "${platforms[@]}" -d "$dir" \
    "${per_version[@]}"
done
total=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
echo "$dir: $(ls "$dir"/*.whl | wc -l) wheels, $((total / 1048576)) MiB (the working tree adds about 1 MiB; 64 MiB in all)"
[ "$total" -lt $((62 * 1048576)) ] || echo "too large to carry: leave out bitsandbytes (NO_BITSANDBYTES=1) or a Python version" >&2
