"""A non-editable install: the wheel carries the prebuilt JupyterLab extension where JupyterLab looks
for it (<prefix>/share/jupyter/labextensions/jupyter-llm/), as well as the widget's JavaScript.

Builds the wheel from a copy of the sources (pip, no build isolation, no network): about 3 s."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from paths import ROOT

BUILT = ROOT / "jupyter_llm" / "labextension"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    if not (BUILT / "package.json").is_file():
        pytest.skip("the labextension is not built (bash scripts/setup.sh builds it with npm)")
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")  # a copy: the build leaves no build/ in the repository
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "jupyter_llm", source / "jupyter_llm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-q", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    [path] = out.glob("jupyter_llm-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_installs_the_prebuilt_labextension(wheel):
    name = json.loads((BUILT / "package.json").read_text())["name"]
    assert name == "jupyter-llm"
    data = [n for n in wheel.namelist() if ".data/data/share/jupyter/labextensions/" in n]
    prefix = data[0].split("share/jupyter/")[0] if data else ""
    shipped = sorted(n.removeprefix(f"{prefix}share/jupyter/labextensions/{name}/") for n in data)
    built = sorted(p.relative_to(BUILT).as_posix() for p in BUILT.rglob("*") if p.is_file())
    assert shipped == built, f"wheel: {shipped}\nbuilt: {built}"
    assert "package.json" in shipped
    assert {f"jupyter_llm/labextension/{n}" for n in built} <= set(wheel.namelist())  # and as package data
    entries = [n for n in shipped if n.startswith("static/remoteEntry.") and n.endswith(".js")]
    assert len(entries) == 1, shipped
    package = json.loads(wheel.read(f"{prefix}share/jupyter/labextensions/{name}/package.json"))
    assert package["jupyterlab"]["_build"]["load"] == entries[0], package["jupyterlab"].get("_build")


def test_wheel_carries_the_widget_assets(wheel):
    names = set(wheel.namelist())
    assert {"jupyter_llm/notebook/widgets/playground.js", "jupyter_llm/notebook/widgets/playground.css"} <= names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "labextension/"))]
