"""Exporting a Hugging Face checkpoint to an ONNX Runtime GenAI model folder with the
GenAI model builder, once per (source weights, precision, execution provider), into the
model cache, so that the second load takes seconds.

The builder runs in a subprocess: it imports torch and transformers, holds the whole
float32 checkpoint in memory and prints a lot; a child process keeps all of that out of
the kernel, and its "Reading layer N" lines drive our progress bar.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from huggingface_hub import snapshot_download

from jupyter_llm.errors import BackendError
from jupyter_llm.model_files import ModelSpec, cache_dir, ensure_hf_folder, file_hash
from jupyter_llm.progress import steps

PRECISIONS = ("fp32", "int8", "int4")
PROVIDERS = ("cpu", "cuda")
EXPORT_HINT = "pip install 'jupyter-llm[onnx]'"
METADATA = "jupyter_llm_export.json"  # written beside genai_config.json in our exports


def is_genai_folder(path: str | Path) -> bool:
    """A folder that already holds an ONNX Runtime GenAI model."""
    return (Path(path) / "genai_config.json").is_file()


def export_metadata(folder: str | Path) -> dict:
    """What our export recorded about a folder (empty for folders exported elsewhere)."""
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


def _local_hf_folder(spec: ModelSpec, progress: bool) -> Path:
    """A folder with config.json and weights: GGUF files are converted (cached), hub ids downloaded."""
    if spec.kind == "hub":
        return Path(snapshot_download(spec.path))
    return Path(ensure_hf_folder(spec, progress))


def source_hash(spec: ModelSpec, folder: Path) -> str:
    """The hash of the weights an export comes from: the GGUF file itself, or the config and
    weight files of an HF folder (file hashes are remembered in the cache, so this is cheap)."""
    if spec.is_gguf:
        return file_hash(spec.path)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for path in files:
        digest.update(f"{path.name}:{file_hash(path)}\n".encode())
    return digest.hexdigest()


def export_folder(spec: ModelSpec, precision: str, provider: str, progress: bool = True,
                  root: str | Path | None = None) -> Path:
    """The cached GenAI export of a model, built on first use under `root` (default: <model cache>/onnx)."""
    folder = _local_hf_folder(spec, progress)
    root = Path(root).expanduser() if root else cache_dir() / "onnx"
    target = root / f"{spec.name}-{source_hash(spec, folder)[:16]}-{precision}-{provider}"
    if is_genai_folder(target):
        return target
    missing = [m for m in ("onnx", "onnx_ir") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(f"exporting to ONNX needs {', '.join(missing)}: {EXPORT_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".exporting-", dir=target.parent))
    try:
        _run_builder(folder, staging / "model", precision, provider, staging / "builder-cache", progress,
                     f"Exporting {spec.name} to ONNX {precision} (once; cached in {target.parent})")
        metadata = {"source": str(folder), "precision": precision, "execution_provider": provider}
        (staging / "model" / METADATA).write_text(json.dumps(metadata))
        if target.exists():
            shutil.rmtree(target)
        (staging / "model").rename(target)  # atomic: a half-written export is never used
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _run_builder(source: Path, output: Path, precision: str, provider: str, builder_cache: Path,
                 progress: bool, description: str) -> None:
    config = json.loads((source / "config.json").read_text())
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(output),
               "-p", precision, "-e", provider, "-c", str(builder_cache)]
    tail: deque[str] = deque(maxlen=30)
    # Steps: one per "Reading ..." line (embedding, each layer, final norm, LM head), then saving.
    with steps(progress, description, layers + 4) as bar:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1"}) as child:
            assert child.stdout is not None
            for line in child.stdout:
                tail.append(line.rstrip())
                if line.startswith(("Reading ", "Saving ONNX model")):
                    bar.update(1)
        if child.returncode != 0:
            log = "\n".join(tail)
            raise BackendError(f"the ONNX Runtime GenAI model builder failed (exit {child.returncode}) "
                               f"on {source}:\n{log}")
