#!/usr/bin/env bash
# Builds parity/.venv-tina: Tina's own pins (parity/requirements-tina.txt), separate from the project's .venv.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-tina/bin/python ]; then
  "$PYTHON" -m venv .venv-tina
fi
.venv-tina/bin/pip install -q --upgrade pip
.venv-tina/bin/pip install -q -r requirements-tina.txt
# Like the project's install: PyPI's torchvision/torchaudio fail beside the CPU torch build.
.venv-tina/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv-tina/bin/python -c "import trl, math_verify, transformers, torch; print('tina env:', trl.__version__, transformers.__version__, torch.__version__)"
