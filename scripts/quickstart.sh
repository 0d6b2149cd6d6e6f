#!/usr/bin/env bash
# The main job, offline: set up the venv and build vpfast (scripts/setup_venv.sh), report what will
# run here, then the demo: a frozen ImageNet EfficientNet-Lite0 (packaged weights) prompted to
# classify MNIST digits (packaged data) with EVP and the pad prompter. Arguments go to `vpfast demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_venv.sh
setup_venv "demo"

vpfast info
vpfast demo "$@"
