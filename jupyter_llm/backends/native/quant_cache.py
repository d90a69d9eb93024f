"""The int8 model, stored once quantized: later loads read int8 weights and never build float32 ones.

Quantizing means loading the float32 model (four times the int8 bytes), a calibration pass
and a smoothing step (quant.py): seconds, and a resident peak of about 1.4 GiB for SmolLM2.
The result goes to the model cache as safetensors, the int8 weights with their per-channel
scales beside the float tensors that stay (norms, embedding), keyed by the source folder's
files and the quantization recipe; a load from it takes the int8 tensors as they are.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.int8_linear import Int8Linear
from jupyter_llm.backends.native.loader import load_model
from jupyter_llm.backends.native.models import build_model
from jupyter_llm.backends.native.quant import CALIBRATION_TEXT, quantize_int8
from jupyter_llm.model_files import save_safetensors
from jupyter_llm.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

RECIPE = "int8-dynamic-smoothquant-down-0.7-v1"  # change it when quant.py changes what it computes
WEIGHT, SCALES, BIAS = ".int8_weight", ".int8_scales", ".bias"


def cache_path(folder: Path) -> Path:
    """Where the int8 copy of the model in `folder` lives: a digest of the folder's weight files
    (path, size, modification time), its config, the recipe and the calibration text."""
    from jupyter_llm.model_files import cache_dir

    folder = folder.resolve()
    digest = hashlib.sha256(f"{folder}\n{RECIPE}\n{CALIBRATION_TEXT}".encode())
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), folder / "config.json"]):
        stat = file.stat()
        digest.update(f"{file.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return cache_dir() / "quantized" / f"{folder.name}-{digest.hexdigest()[:16]}" / "model.safetensors"


def save_int8(model: nn.Module, path: Path) -> None:
    """Store a quantized model (`save_safetensors`: never half a file)."""
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            weight, scales, bias = module.int8_state()
            tensors[name + WEIGHT], tensors[name + SCALES] = weight.contiguous(), scales.contiguous()
            if bias is not None:
                tensors[name + BIAS] = bias.contiguous()
    save_safetensors(tensors, path, {"recipe": RECIPE, "reduce_range": json.dumps(False)})


def load_int8(config: ModelConfig, path: Path) -> nn.Module:
    """The quantized model stored at `path` (CPU): Int8Linear layers from their int8 parts,
    every other tensor copied out of the file."""
    with torch.device("meta"):
        model = build_model(config)
    # Two passes, so that no view into the file's memory map outlives its pass: the float tensors
    # are copied out first, then each int8 weight is packed (fbgemm copies it) and dropped.
    floats: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as stored:
        names = list(stored.keys())
        int8_layers = {name.removesuffix(WEIGHT) for name in names if name.endswith(WEIGHT)}
        for name in names:
            if not name.endswith((WEIGHT, SCALES)) and name.removesuffix(BIAS) not in int8_layers:
                floats[name] = stored.get_tensor(name).clone()
    with safe_open(str(path), framework="pt") as stored:
        for layer in sorted(int8_layers):
            bias = stored.get_tensor(layer + BIAS) if layer + BIAS in names else None
            linear = Int8Linear.from_int8(stored.get_tensor(layer + WEIGHT), stored.get_tensor(layer + SCALES), bias)
            parent, _, attr = layer.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, linear)
    model.load_state_dict(floats, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_int8_folder(folder: Path) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """The int8 model of an HF folder with its config and tokenizer: from the cache when it is
    stored there, else loaded in float32, quantized (quant.py) and stored for the next load."""
    tokenizer = load_tokenizer(str(folder))
    config = ModelConfig.from_folder(folder)
    path = cache_path(folder)
    if path.is_file():
        try:
            return load_int8(config, path), config, tokenizer
        except Exception as error:  # noqa: BLE001 (a damaged or foreign file: quantize again)
            log.warning("cannot read the stored int8 model %s (%s); quantizing again", path,
                        str(error).strip().splitlines()[0][:200])
    model, config = load_model(folder, dtype=torch.float32)
    quantize_int8(model, tokenizer.encode(CALIBRATION_TEXT))
    try:
        save_int8(model, path)
    except OSError as error:  # a read-only cache costs the next load its time, nothing else
        log.warning("cannot store the int8 model in %s: %s", path.parent, error)
    return model, config, tokenizer
