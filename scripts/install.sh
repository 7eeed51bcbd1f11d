#!/usr/bin/env bash
# Create .venv (if missing) and install mm_gmpo with its test tools into it.
# torch/torchvision: if the venv has no torch yet, install the matching pair torch==2.14.1 / torchvision==0.29.1
# (on the project's CPU machines both come from local disk). On a GPU machine with your own CUDA torch, use
# your environment instead:  pip install -e ".[vllm,dev]"   (vLLM pins its own torch).
# Extra arguments are passed as extras, e.g.  bash scripts/install.sh vllm
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
fi
extras="dev${1:+,$1}"
"${PIP[@]}" install -e ".[${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mm_gmpo, torch, torchvision, transformers; print('mm_gmpo', mm_gmpo.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
