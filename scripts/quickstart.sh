#!/usr/bin/env bash
# First run: set up the venv and build vpfast (scripts/setup_venv.sh), report what will run here,
# then run the compose example.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_venv.sh
setup_venv ""

vpfast info
"$PY" examples/compose_example.py
