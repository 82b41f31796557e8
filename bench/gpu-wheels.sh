#!/usr/bin/env bash
# Prepare, here (with internet), the wheels bench/gpu.sh installs on a GPU machine that has none:
# MLX with its CUDA 13 backend and diffusers, for the machine's Python (default 3.12). The ~90 MB
# mlx-cuda-13 wheel is split into parts of at most 40 MB, so that no single transfer exceeds a
# per-call size limit; gpu.sh joins them. Output: .whl/ (git-ignored through .git/info/exclude).
#   bash bench/gpu-wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mlx=$(.venv/bin/python -c 'import mlx.core as mx; print(mx.__version__)')
platforms=()
for p in manylinux_2_35_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d .whl "mlx==$mlx" "mlx-cuda-13==$mlx" "diffusers==0.42.1"
for wheel in .whl/mlx_cuda_13-*.whl; do
  split -b 40M -d -a 2 "$wheel" "$wheel.part-" && rm "$wheel"
done
ls -la .whl
