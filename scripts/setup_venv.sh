#!/usr/bin/env bash
# Create ./.venv with everything this project needs, from scratch, from package registries only.
# CPU hosts get the CPU build of torch 2.13.0; hosts with an NVIDIA driver get the CUDA build
# pinned in requirements.txt (the same as the Cog image).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
else
  .venv/bin/python -m pip install --quiet torch==2.13.0
  grep -v '^torch==' requirements.txt > .venv/requirements-cpu.txt
  .venv/bin/python -m pip install --quiet -r .venv/requirements-cpu.txt -r requirements-dev.txt
fi
touch .venv/.installed
.venv/bin/python -c "import torch, cog, coglet, tokenizers, safetensors, PIL; print('environment ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
