#!/usr/bin/env bash
# The project's test command: set up the venv and build vpfast (scripts/setup_venv.sh), lint, then
# run every test tier (the gpu tier skips itself without CUDA). Arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_venv.sh
setup_venv "test,clip,demo"

"$PY" -m ruff check .

status=0
"$PY" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests, which counts as a failure" >&2
  exit 1
fi
exit "$status"
