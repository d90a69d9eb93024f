"""Execute notebooks headless through a real kernel (nbclient + ipykernel) and fail on any
error output. Executed copies go to build/notebooks/.

    python scripts/run_notebook.py notebooks/01-quickstart.ipynb [more.ipynb ...]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def error_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """Every error output and every stderr stream that looks like a traceback."""
    found = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {index}: {out.get('ename')}: {out.get('evalue')}")
            elif (out.get("output_type") == "stream" and out.get("name") == "stderr"
                  and "Traceback" in out.get("text", "")):
                found.append(f"cell {index}: traceback on stderr")
    return found


def run(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    out = Path("build/notebooks") / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return nb


def main(paths: list[str]) -> int:
    failed = False
    for name in paths:
        nb = run(Path(name))
        errors = error_outputs(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                for out in cell.get("outputs", []):
                    text = out.get("text") or out.get("data", {}).get("text/plain", "")
                    if text:
                        print(text.rstrip())
        print(f"{name}: {'FAILED: ' + '; '.join(errors) if errors else 'ok'} (executed copy in build/notebooks/)")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
