#!/usr/bin/env bash
# bench/gpu.sh: every GPU figure of the pipeline in one prepared run (< 8 minutes on one H200).
#
#   bench/gpu.sh OUT_DIR               on a CUDA machine: writes OUT_DIR/results.json and results.md
#   bench/gpu.sh --cpu-smoke OUT_DIR   every part on tiny sizes on CPU in under a minute (CI runs it)
#   bench/gpu.sh --help                what it measures (bench/gpu_bench.py's help)
#
# Python: $PYTHON, else .venv/bin/python, else python3. On a machine without the bench's extra
# packages (diffusers, torch-fidelity) and no network, put their wheels in .whl/ first
# (bench/gpu_wheels.sh, run where pip can download); they are installed into a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/ddpm-bench-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_bench.py "$@"
