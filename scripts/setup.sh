#!/usr/bin/env bash
# Set up mlx-sdxs in ./.venv.
#   bash scripts/setup.sh        the runtime and the studio (mlx, numpy, safetensors, huggingface-hub, opencv,
#                                starlette, uvicorn, PyAV)
#   bash scripts/setup.sh test   + the test/bench oracles (torch, diffusers, transformers, coremltools,
#                                onnxruntime, matplotlib, playwright) and, on Debian/Ubuntu, Chromium
# On Linux it also installs OpenBLAS: MLX's Linux CPU wheel ships a reference BLAS ~30x slower.
# PYTHON=/path/to/python picks the interpreter; otherwise the first of python3.13 … python3.10, python3
# that is 3.10 or newer.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

pick_python() {
  local found=() candidate version
  for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3.10 python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    version=$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    found+=("$candidate=$version")
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  {
    echo "setup: mlx-sdxs needs Python 3.10 or newer; found: ${found[*]:-no python3 at all}."
    echo "setup: get one from Homebrew (brew install python@3.12), python.org (https://www.python.org/downloads/)"
    echo "setup: or your distribution (Debian/Ubuntu: apt-get install python3), then run this again"
    echo "setup: (or point PYTHON=/path/to/python3.12 at it)."
  } >&2
  exit 1
}

if [ -x .venv/bin/python ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  python=.venv/bin/python
else
  python=$(pick_python)
fi

if [ "$(uname -s)" = Linux ]; then
  need=()
  ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0' || need+=(libopenblas0-pthread)
  ldconfig -p 2>/dev/null | grep -q 'libGL\.so\.1' || need+=(libgl1)        # opencv-python
  ldconfig -p 2>/dev/null | grep -q 'libglib-2\.0\.so\.0' || need+=(libglib2.0-0)
  if [ "$mode" = test ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    need+=(chromium)  # the studio's browser test (it skips, saying so, where there is none)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null; then
      sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
      $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "setup: please install ${need[*]} (or your distro's OpenBLAS/libGL/Chromium) with your package manager" >&2
    fi
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "$mode" = test ]; then
  # Pin the torch the oracles were checked with before the extras can pull a newer (multi-GB CUDA) build.
  "${pip[@]}" "torch==2.13.*"
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e ".[studio]"
fi

# --- Native CPU kernels (optional, x86-64 Linux; mlx_sdxs/_native): built when a C++ compiler and CMake are
# here. The build pip-installs its own build-time packages (nanobind, oneDNN); a skipped or failed build prints
# one line and never fails the setup: the `cpu` kernel policy then keeps the pure-MLX kernels.
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && command -v cmake >/dev/null \
  && { command -v c++ || command -v g++ || command -v clang++; } >/dev/null; then
  .venv/bin/python -m mlx_sdxs._native.build --install-deps || true
else
  echo "setup: native CPU kernels skipped (they need x86-64 Linux, a C++ compiler and CMake); using the pure-MLX CPU kernels"
fi
echo "setup: ready (.venv, mode=$mode, $(.venv/bin/python --version))"
