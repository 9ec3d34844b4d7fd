#!/usr/bin/env bash
# Create .venv and install retriever with its test dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG=.venv/setup.log
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
: > "$LOG"
pip() {
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" >>"$LOG" 2>&1 \
    || { cat "$LOG" >&2; echo "setup failed: pip $*" >&2; exit 1; }
}
echo "setting up .venv (log: $LOG)" >&2
pip install --upgrade pip
# These exact builds install from local disk on the project's machines; elsewhere pip downloads them.
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || pip install torch==2.14.1 torchvision==0.29.1
# This project was itself distributed as `retriever` before it became caption-retriever: an old
# development install of that name would shadow the new one, so it goes. weecology's Data
# Retriever (PyPI's `retriever`) installs the same package and command: it cannot share .venv.
OLD=$(.venv/bin/python -c "
from importlib.metadata import PackageNotFoundError, distribution
try:
    meta = str(distribution('retriever').metadata).lower()
except PackageNotFoundError:
    meta = None
print('' if meta is None else 'weecology' if 'weecology' in meta or 'data retriever' in meta else 'ours')")
if [ "$OLD" = ours ]; then
  pip uninstall -y retriever
elif [ "$OLD" = weecology ]; then
  echo "setup failed: weecology's Data Retriever is installed in .venv and cannot share an environment with caption-retriever (pip uninstall retriever, or remove .venv)" >&2
  exit 1
fi
# The library with its test, docs and lint/type-check tools (the dev extra).
pip install -e ".[dev]"
# clip-interrogator only for its word lists (the tests' distractor texts); none of its model code is used.
pip install --no-deps clip-interrogator==0.6.0
# clip-benchmark only for its zero-shot retrieval evaluator, which `retriever eval`'s recall is
# checked against (that module needs torch and tqdm alone; the rest of its deps are not needed).
pip install --no-deps clip-benchmark==1.6.2
# cn_clip only for the Chinese-CLIP parity tests (tests/models/test_cnclip.py), which compare retriever's
# vectors with its reference code. --no-deps: it pins lmdb==1.3.0 (no wheels for current Pythons) for its
# training code, which is not used; its model and tokenizer code need six besides torch.
pip install six
pip install --no-deps cn_clip==1.6.0
.venv/bin/python -c "import retriever, torch, open_clip, faiss, ray"
