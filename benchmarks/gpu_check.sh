#!/usr/bin/env bash
# One prepared check of a CUDA machine with PyTorch preinstalled: the gpu tests, a three-minute
# run of the full ResNet-50 recipe with its test evaluation, and the CUDA inference benchmark,
# all within eight minutes, every stage's result in one JSON (benchmarks/gpu_check.py says more).
#
#   benchmarks/gpu_check.sh [--out DIR] [--train-minutes 3] [--budget-s 480] [--allow-cpu] ...
#
# Environment: PYTHON (the interpreter that holds PyTorch; default python3), WHEELHOUSE (the
# project's other dependencies as wheels; default wheelhouse/cuda, empty for none),
# GPU_CHECK_SITE (where those wheels are installed; default /tmp/satseg-site), OUT (default
# output folder), GPU_CHECK_ALLOW_CPU=1 (rehearse every stage shrunk on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
