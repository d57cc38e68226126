#!/usr/bin/env bash
# bench/gpu_wheels.sh: download, where pip can reach PyPI, the wheels bench/gpu.sh needs on a GPU
# machine that has torch but no network: the reference U-Net (diffusers) and the FID network
# (torch-fidelity), for CPython 3.12 on x86-64 Linux, into .whl/ (in .gitignore). bench/gpu.sh
# installs whatever .whl/ holds into a temporary folder before it starts.
#
#   bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
# diffusers, torch-fidelity and importlib_metadata's needs are pure Python (py3-none-any); lmdb
# (data_prep imports it; the loader part makes shards with data_prep) is a compiled cp312 wheel.
# Their other needs (numpy, scipy, Pillow, huggingface-hub, ...) are in such images already.
# Versions: the lock's (constraints.txt), those CI tests against.
${PIP:-python3 -m pip} download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    -c constraints.txt diffusers torch-fidelity importlib-metadata lazy-importer lmdb
ls -la .whl
