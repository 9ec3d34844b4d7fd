#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
