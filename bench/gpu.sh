#!/usr/bin/env bash
# The GPU check, on a CUDA machine, in under 8 minutes: what users of a GPU run, measured.
#   bash bench/gpu.sh OUT [WHEELS]
# 1. installs the wheels in WHEELS (default .whl/, from bench/gpu-wheels.sh: mlx + mlx-cuda-13 split in
#    parts, joined here; diffusers) into a target folder, without network;
# 2. stops with exit status 3 where there is no CUDA GPU (everything before this step runs anywhere);
# 3. runs the float16 parity tests (portable kernels, float16, on mx.gpu) against the float32 oracles;
# 4. runs the bench at 512: MLX portable float16 vs torch CUDA float16 vs ONNX Runtime CUDA where available.
# Writes gpu.txt (the device), parity.log, the bench's JSON + markdown and gpu.log into OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu.sh OUT [WHEELS]}
wheels=${2:-.whl}
python=${PYTHON:-python3}
mkdir -p "$out"
log() { echo "gpu.sh: $*" | tee -a "$out/gpu.log"; }

for first in "$wheels"/*.whl.part-00; do
  [ -e "$first" ] || continue
  wheel=${first%.part-00}
  cat "$wheel".part-* > "$wheel.joining" && mv "$wheel.joining" "$wheel"
  log "joined $(ls "$wheel".part-* | wc -l) parts into $(basename "$wheel")"
done
target=${GPU_SITE:-/tmp/mlx-sdxs-gpu-site}
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$wheels"/*.whl
  log "installed $(ls "$wheels"/*.whl | wc -l) wheels into $target"
fi
export PYTHONPATH="$target:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  log "no CUDA GPU here (nvidia-smi finds none): stopping before the GPU steps"
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$python" - <<'PY' | tee -a "$out/gpu.txt"
import mlx_sdxs, mlx.core as mx
from mlx_sdxs import runtime
assert mx.default_device() == mx.gpu, "MLX computes on the CPU here: mlx-cuda-13 is not installed or not loaded"
print("mlx", mx.__version__, mx.device_info(), runtime.describe())
PY

start=$SECONDS
log "float16 parity on the GPU"
set +e
timeout 240 "$python" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_float16.py \
  tests/test_unet.py tests/test_vae.py tests/test_clip.py tests/test_layers.py -k "float16 or fp16" 2>&1 | tee "$out/parity.log"
parity=${PIPESTATUS[0]}
set -e
log "parity exit status $parity after $((SECONDS - start)) s"

log "bench at 512"
timeout 330 "$python" -m bench.run --backends mlx,torch,onnx --sizes 512 --frames 9 --warmup 3 --loop-frames 30 \
  --device cuda --torch-dtype float16 --out "$out" 2>&1 | tee "$out/bench.log"
log "done in $((SECONDS - start)) s"
exit "$parity"
