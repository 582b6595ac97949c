#!/usr/bin/env bash
# Create ./.venv with everything this project needs, from scratch, from package registries only.
# torch is the version pinned in requirements.txt, the one the Cog image installs. pip takes the
# best wheel of that version its indexes offer: PyPI's is the CUDA 13.0 build (it also runs on
# CPU); a machine whose pip configuration offers the +cpu build (the CPU test machine) gets that.
# For the small CPU build elsewhere: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu make setup
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then index=(--extra-index-url "$TORCH_INDEX_URL"); fi
.venv/bin/python -m pip install --quiet ${index[@]+"${index[@]}"} -r requirements.txt -r requirements-dev.txt
touch .venv/.installed
.venv/bin/python -c "import torch, cog, coglet, tokenizers, safetensors, PIL; print('environment ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
