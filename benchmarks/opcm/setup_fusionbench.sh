#!/usr/bin/env bash
# Create (or complete) the FusionBench virtualenv used by run_fusionbench_opcm.py.
#   benchmarks/opcm/setup_fusionbench.sh [VENV_DIR]      (default /work/venvs/fusionbench)
# torch is pinned and installed first (a local CPU wheel satisfies torch==2.13.0), so fusion-bench's
# dependency resolution never pulls a different (CUDA) torch. Running it again is a no-op.
set -euo pipefail

venv="${1:-/work/venvs/fusionbench}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    "${pip[@]}" install torch==2.13.0
fi
if ! "$venv/bin/python" -c 'import fusion_bench.method.opcm.opcm_general' 2>/dev/null; then
    "${pip[@]}" install fusion-bench "transformers<5" "datasets<4" torch==2.13.0
fi

"$venv/bin/python" - <<'PY'
from importlib.metadata import version

import torch

print(f"fusion-bench {version('fusion-bench')}, torch {torch.__version__}, "
      f"transformers {version('transformers')}, datasets {version('datasets')}")
PY
