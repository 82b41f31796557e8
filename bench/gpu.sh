#!/usr/bin/env bash
# What an NVIDIA GPU does with mlx-sdxs, checked and measured in one go (about 5 minutes on an H200):
#   1. the non-slow test suite, with MLX computing on the GPU (float16 and the cuda kernels where they apply);
#   2. one frame every way it can run (bench.frame: MLX staged / compiled / in flight, torch eager and as a CUDA
#      graph) and the side-by-side bench with the loop (bench.run) at 256 and 512;
#   3. the camera loop on a 240 FPS synthetic source at 512 (the AI FPS a user sees).
# Set up once:  pip install -e '.[cuda,bench]' pytest pytest-timeout   (or scripts/setup.sh test + mlx[cuda13])
# Run:          bash bench/gpu.sh [OUT]        (default bench/results/runs; PYTHON=... picks the interpreter)
# A GPU machine without internet: `bash ../shared/gpu/bundle.sh .gpu` on a machine with it, copy the checkout
# over, then `source .gpu/activate.sh && bash bench/gpu.sh OUT` there.
# Exit status: the suite's; 3 where MLX does not compute on an NVIDIA GPU (nothing else is run then).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/runs}
python=${PYTHON:-python3}
mkdir -p "$out"
log() { echo "gpu.sh: $*" | tee -a "$out/gpu.log"; }

if ! "$python" -c 'import sys, mlx_sdxs.runtime as r; sys.exit(0 if r.on_cuda() else 3)' 2>>"$out/gpu.log"; then
  log "MLX does not compute on an NVIDIA GPU here (install mlx[cuda13]: pip install 'mlx-sdxs[cuda]'); stopping"
  exit 3
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$python" -c 'import mlx.core as mx, mlx_sdxs.runtime as r; print("mlx", mx.__version__, r.describe())'; } \
  | tee "$out/gpu.txt"

start=$SECONDS
parallel=()
"$python" -c 'import xdist' 2>/dev/null && parallel=(-n 8)  # kernel compilation is CPU-bound: spread it
log "the suite on the GPU (non-slow)"
# -v: each test's outcome is in the log as it finishes, so a run cut short still names its failures.
timeout 900 "$python" -m pytest -v -p no:cacheprovider -m "not slow" "${parallel[@]}" --timeout 300 -rfs \
  --junitxml "$out/suite.xml" tests > "$out/suite.log" 2>&1
suite=$?
tail -3 "$out/suite.log" | tee -a "$out/gpu.log"
log "suite exit status $suite after $((SECONDS - start)) s"

log "one frame, every way (bench.frame)"
timeout 600 "$python" -m bench.frame --sizes 256,512 --frames 30 --torch --out "$out" > "$out/frame.log" 2>&1
log "side by side with the loop (bench.run)"
timeout 900 "$python" -m bench.run --backends mlx,torch,torch-graph --sizes 256,512 --frames 9 --loop-frames 120 \
  --device cuda --out "$out" > "$out/bench.log" 2>&1
log "the camera loop: 240 FPS synthetic source, 512, headless, 20 s"
timeout 300 "$python" -m mlx_sdxs.cli camera --source synthetic --fps 240 --headless --render-size 512 \
  --duration 20 > "$out/camera.log" 2>&1
tail -3 "$out/camera.log" | tee -a "$out/gpu.log"
log "done in $((SECONDS - start)) s"
exit "$suite"
