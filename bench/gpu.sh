#!/usr/bin/env bash
# The GPU benchmark in one command (bench/README.md): install the carried wheels, then `python -m bench.gpu`.
#
#   bash bench/gpu.sh [WHEELS_DIR] [OUT_DIR] [more options of python -m bench.gpu]
#
# WHEELS_DIR defaults to bench/wheels (filled by bench/gpu_wheels.sh), OUT_DIR to $OUT when set (the device
# machine's folder that comes back), else bench/results. gpu.json and gpu.md go to OUT_DIR. Everything, the
# install included, fits in 8 minutes: the benchmark gets what the install left of them.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-bench/wheels}
out=${2:-${OUT:-bench/results}}
shift $(($# < 2 ? $# : 2))
py=${PYTHON:-python}
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "$($py -V 2>&1); $(nproc) CPU cores"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$py -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|datasets|pydantic|trl|liger|bitsandbytes|pandas|pyarrow|huggingface.hub|fsspec|typing.extensions|triton) " || true

if compgen -G "$wheels/*.whl" >/dev/null; then
  # loratune's own requirements together; each optional package alone, so one that cannot install costs only its
  # own parts (reported as not run or skipped).
  $py -m pip install -q --no-index --find-links "$wheels" pydantic datasets pyyaml \
    || echo "gpu.sh: loratune's requirements did not install from $wheels (see pip's message above)"
  for package in trl liger-kernel bitsandbytes; do
    if compgen -G "$wheels/${package//-/_}-*.whl" >/dev/null; then
      $py -m pip install -q --no-index --find-links "$wheels" "$package" || echo "gpu.sh: $package did not install"
    fi
  done
else
  echo "gpu.sh: no wheels in $wheels; using the packages installed"
fi
budget=$((470 - SECONDS))
echo "gpu.sh: installs took ${SECONDS}s; the benchmark gets ${budget}s"
exec $py -m bench.gpu --out "$out" --budget-s "$budget" "$@"
