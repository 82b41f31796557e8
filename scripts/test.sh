#!/usr/bin/env bash
# The test suite under both kernel policies: `auto` (this machine's choice: the CPU rewrites on a CPU)
# and `portable` (MLX built-ins only, exactly what Metal and CUDA run). The two runs share the oracle
# cache (torch reference outputs and converted weights), so the second skips the expensive builds, and the
# second leaves out the tests marked policy_independent (pinned kernels, no MLX model, loop plumbing). Where
# the native CPU kernels are built, a third run repeats those tests on `auto` with them off.
#   bash scripts/test.sh [pytest arguments…]
set -euo pipefail
cd "$(dirname "$0")/.."
export MLX_SDXS_TEST_CACHE="${MLX_SDXS_TEST_CACHE:-$PWD/.cache/test-oracles}"
echo "test: kernel policy auto"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "test: kernel policy portable (the tests whose result the policy can change)"
MLX_SDXS_KERNELS=portable .venv/bin/python -m pytest -q -p no:cacheprovider -m "not policy_independent" "$@"
if .venv/bin/python -c 'import sys, mlx_sdxs.native as n; sys.exit(n.load()[0] is None)' 2>/dev/null; then
  echo "test: kernel policy auto with the native CPU kernels off (the first run had them on)"
  MLX_SDXS_NATIVE=off .venv/bin/python -m pytest -q -p no:cacheprovider -m "not policy_independent" "$@"
fi
