#!/usr/bin/env bash
# Every GPU path of retriever, run once, printed as one table (see bench/gpu_check.py).
# On a GPU machine: bash bench/gpu_check.sh   (under 8 minutes). Without a CUDA GPU it stops at once
# with exit status 2, saying what is missing; `--device cpu --quick` runs the same code on the CPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
if [ -x "$here/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$here/../.venv/bin/python"; fi
if [ "$#" -eq 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: cannot run: no NVIDIA driver (nvidia-smi not found). For a dry run on the CPU: bash bench/gpu_check.sh --device cpu --quick" >&2
    exit 2
fi
exec timeout 900 "$python" "$here/gpu_check.py" "$@"
