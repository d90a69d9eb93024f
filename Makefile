# The two commands of the README. Both set everything up first (scripts/setup.sh, idempotent).
.PHONY: setup quickstart test test-browser

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

setup:
	bash scripts/setup.sh

# Executes the quickstart notebook headless with the embedded model; the executed copy
# lands in build/notebooks/.
quickstart: setup
	.venv/bin/python scripts/run_notebook.py notebooks/01-quickstart.ipynb

test: setup
	.venv/bin/ruff check jupyter_llm tests benchmarks scripts
	npm --prefix labextension test --silent
	.venv/bin/python -m pytest -q -rs

# Only the JupyterLab + headless Chromium tests (playground widget, labextension; about a minute).
# `make test` runs them too, last.
test-browser: setup
	.venv/bin/python -m pytest -q tests/browser
