#!/usr/bin/env bash
# Set up mlx-sdxs in ./.venv.
#   bash scripts/setup.sh        runtime only (mlx, numpy, safetensors, huggingface-hub, opencv)
#   bash scripts/setup.sh test   + the test/bench oracles (torch, diffusers, transformers, coremltools, onnxruntime)
# On Linux it also installs OpenBLAS: MLX's Linux CPU wheel ships a reference BLAS ~30x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

if [ "$(uname -s)" = Linux ]; then
  need=()
  ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0' || need+=(libopenblas0-pthread)
  ldconfig -p 2>/dev/null | grep -q 'libGL\.so\.1' || need+=(libgl1)        # opencv-python
  ldconfig -p 2>/dev/null | grep -q 'libglib-2\.0\.so\.0' || need+=(libglib2.0-0)
  if [ ${#need[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null; then
      sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
      $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "setup: please install ${need[*]} (or your distro's OpenBLAS/libGL) with your package manager" >&2
    fi
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "$mode" = test ]; then
  # Pin the torch the oracles were checked with before the extras can pull a newer (multi-GB CUDA) build.
  "${pip[@]}" "torch==2.13.*"
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi
echo "setup: ready (.venv, mode=$mode)"
