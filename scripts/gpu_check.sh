#!/usr/bin/env bash
# The GPU check of issue 11: one command for a bare device machine (system python3 with torch,
# no .venv, no network), at most 8 minutes, writing $OUT/gpu_check.json and $OUT/gpu_check.log.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # or --dry-run: every stage on CPU, narrow widths
#
# Options (scripts/gpu_check.py): --only a,b  --skip a,b  --budget-s S  --out DIR  --keep
# Python: $PYTHON, else python3 if it has torch, else ./.venv/bin/python.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi
exec "$PY" scripts/gpu_check.py "$@"
