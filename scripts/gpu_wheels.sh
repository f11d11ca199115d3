#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.py needs that the GPU machine's image lacks (benchmarks/GPU.md), into .whl/:
# TRL and the dependencies of it the image does not hold (datasets, dill, multiprocess; the rest - accelerate,
# transformers, pandas, pyarrow, xxhash, fsspec, ... - are there), and liger-kernel (the suite's rival fused
# losses; triton is there). asft itself travels as source (the working tree; PYTHONPATH=src).
# For CPython 3.12, manylinux x86_64, no dependencies resolved: each one is named here.
#
#     bash scripts/gpu_wheels.sh            # then carry .whl (git-ignored), at most 60 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5)
mkdir -p .whl
for w in "${WHEELS[@]}"; do
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024)) KiB in $(ls .whl/*.whl | wc -l) wheels"
if (( total >= 60 * 1024 * 1024 )); then
    echo "over 60 MiB: the GPU machine takes at most 64 MiB with the working tree" >&2
    exit 1
fi
