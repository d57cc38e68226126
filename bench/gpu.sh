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
    # Only the wheels this Python can install (.whl/ is made for the GPU machine's CPython 3.12).
    wheels=$("$PYTHON" -c '
import glob
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
ok = set(sys_tags())
print(" ".join(w for w in sorted(glob.glob(".whl/*.whl")) if ok & set(parse_wheel_filename(w.split("/")[-1])[3])))')
    if [[ -n "$wheels" ]]; then
        site="${TMPDIR:-/tmp}/ddpm-bench-site"
        # shellcheck disable=SC2086  # one word per wheel
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $wheels
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_bench.py "$@"
