#!/usr/bin/env bash
# Create .venv (if missing) and install mm_gmpo with its test tools into it.
#   bash scripts/install.sh            CPU: torch==2.14.1 / torchvision==0.29.1 if the venv has no torch yet
#                                      (on the project's CPU machines both come from local disk)
#   bash scripts/install.sh --gpu      GPU: the set measured on an H100, pinned by requirements/gpu-constraints.txt
#                                      (torch 2.11.0, torchvision 0.26.0, vLLM 0.25.1, transformers 5.17), vLLM
#                                      included; use a fresh .venv (VENV=.venv-gpu) if .venv holds the CPU torch
# Other arguments are extras, e.g.  bash scripts/install.sh wandb   or   bash scripts/install.sh --gpu flash
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
gpu=0
if [ "${1:-}" = "--gpu" ]; then gpu=1; shift; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
extras="dev${1:+,$1}"
if [ "$gpu" = 1 ]; then
  C=(-c requirements/gpu-constraints.txt)
  "${PIP[@]}" install "${C[@]}" torch torchvision 2>&1 | grep -v "^WARNING: Location" || true
  "${PIP[@]}" install "${C[@]}" -e ".[vllm,${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
else
  if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "${PIP[@]}" install -e ".[${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
fi
"$VENV/bin/python" -c "import mm_gmpo, torch, torchvision, transformers; print('mm_gmpo', mm_gmpo.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
