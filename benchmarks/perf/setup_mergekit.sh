#!/usr/bin/env bash
# Create (or complete) the mergekit virtualenv used by mergekit_vs_average.py.
#   benchmarks/perf/setup_mergekit.sh [VENV_DIR]   (default $MERGEKIT_VENV, else /work/venvs/mergekit)
# torch is pinned and installed first (a local CPU wheel satisfies torch==2.13.0), so mergekit's dependency
# resolution never pulls a different (CUDA) torch. mergekit is pinned to the version the benchmark was
# written against. Running it again is a no-op.
set -euo pipefail

venv="${1:-${MERGEKIT_VENV:-/work/venvs/mergekit}}"
python="${PYTHON:-python3}"
mergekit_version="0.1.5"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    "${pip[@]}" install torch==2.13.0
fi
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mergekit') != '$mergekit_version')" \
        2>/dev/null; then
    "${pip[@]}" install "mergekit==$mergekit_version" torch==2.13.0
fi

"$venv/bin/python" - <<'PY'
from importlib.metadata import version

import torch

print(f"mergekit {version('mergekit')}, torch {torch.__version__}, transformers {version('transformers')}")
PY
test -x "$venv/bin/mergekit-yaml"
