"""Load a Llama-family GGUF file into the native model with its weights kept in GGUF's blocks.

The config and tokenizer come from the file's converted HF folder (model_files.ensure_hf_folder,
cached); the tensors come straight from the file: Q4_0, Q4_1 and Q8_0 projections become
`BlockLinear` layers (block_quant.py), the token embedding a `BlockEmbedding` that the tied
output layer shares, and the rest (norms, any other tensor type) float32. No float32 copy of
a quantized matrix is ever made. gguf-py's reader parses every metadata field in Python (the
tokenizer's 49,152 strings: about 10 s on these CPUs), so the loaded blocks are stored once in
the model cache as safetensors (`write_cached_blocks`, `read_cached_blocks`) and later loads
read them in well under a second.

GGUF stores the q and k rows of each head in adjacent rotary pairs (llama.cpp's convert
permutes them from HF's rotate-half order), which is the order our models use
(`interleave_rope_rows`), so whole rows of blocks are taken as they are.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jupyter_llm.backends.native.block_quant import GGUF_TYPES, BlockEmbedding, BlockLinear, Blocks, PackedBlocks
from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.models import build_model
from jupyter_llm.errors import ParamError
from jupyter_llm.model_files import cache_dir, file_hash, save_safetensors
from jupyter_llm.tokenizers import Tokenizer, load_tokenizer

# Our names -> GGUF's ({i} is the layer); a list is stacked along the output rows.
PROJECTIONS = {
    "layers.{i}.self_attn.qkv_proj": ["blk.{i}.attn_q", "blk.{i}.attn_k", "blk.{i}.attn_v"],
    "layers.{i}.self_attn.o_proj": ["blk.{i}.attn_output"],
    "layers.{i}.mlp.gate_up_proj": ["blk.{i}.ffn_gate", "blk.{i}.ffn_up"],
    "layers.{i}.mlp.down_proj": ["blk.{i}.ffn_down"],
}
NORMS = {
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "norm.weight": "output_norm.weight",
}


class GGUFTensors:
    """The tensors of a GGUF file by name (a memory map; `blocks` and `floats` copy out)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.tensors = {tensor.name: tensor for tensor in GGUFReader(str(path)).tensors}

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, int]:
        cols, rows = (int(v) for v in self.tensors[name].shape)  # GGUF lists the fastest dimension first
        return rows, cols

    def blocks(self, name: str) -> Blocks:
        tensor = self.tensors[name]
        return Blocks.from_gguf(tensor.tensor_type.name, tensor.data, self.shape(name))

    def floats(self, name: str) -> torch.Tensor:
        """The tensor in float32 (gguf-py dequantizes any type it knows)."""
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(*reversed([int(v) for v in tensor.shape]))


def blocks_layer(tensors: GGUFTensors, names: list[str]) -> nn.Module:
    """One projection: blocks when all its parts are in one block format, else float32 weights."""
    formats = {"Q4_1" if tensors.type_name(n) == "Q4_0" else tensors.type_name(n) for n in names}
    if len(formats) == 1 and all(tensors.type_name(n) in GGUF_TYPES for n in names):
        return BlockLinear(Blocks.cat([tensors.blocks(n) for n in names]))
    weight = torch.cat([tensors.floats(n) for n in names])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def blocks_refusal(config: ModelConfig) -> str | None:
    """Why a model of this config does not load in blocks (None: it does)."""
    if config.architecture != "llama":
        return (f"--quantization gguf loads Llama-family models; this GGUF file is {config.architecture!r} "
                "(use --quantization none)")
    if config.attention_bias or config.mlp_bias:
        return "--quantization gguf loads Llama models without projection biases (use --quantization none)"
    return None


CACHE_VERSION = "gguf-blocks-v2"  # change it when the layout below or gguf_loader's mapping changes


def load_gguf_blocks(gguf_path: Path, folder: Path) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """The model of a Llama-family GGUF file with block weights, its config and its tokenizer
    (`folder`: the file's converted HF folder); from the cached copy when there is one."""
    config = ModelConfig.from_folder(folder)
    refusal = blocks_refusal(config)
    if refusal is not None:
        raise ParamError(refusal)
    tokenizer = load_tokenizer(str(folder))
    cache = cache_path(gguf_path)
    if cache.exists():
        return read_cached_blocks(cache, config), config, tokenizer
    model = read_gguf_blocks(gguf_path, config)
    write_cached_blocks(model, cache)
    return model, config, tokenizer


def cache_path(gguf_path: Path) -> Path:
    """The stored blocks of a GGUF file: keyed by its content (as its converted folder is) and
    CACHE_VERSION, so one copy serves every environment that installs the same file."""
    key = hashlib.sha256(f"{file_hash(gguf_path)}|{CACHE_VERSION}".encode()).hexdigest()[:24]
    return cache_dir() / "gguf-blocks" / f"{gguf_path.stem}-{key}.safetensors"


def write_cached_blocks(model: nn.Module, path: Path) -> None:
    """The model's tensors (each shared one once, blocks packed) and which modules are blocks
    (format and shape), as safetensors."""
    blocks = {name: [m.format, m.out_features, m.in_features]
              for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, BlockLinear)}
    tied = model.lm_head is getattr(model.embed_tokens, "linear", None)
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()
               if not (tied and name.startswith("lm_head."))}
    save_safetensors(tensors, path, {"blocks": json.dumps(blocks), "tied": json.dumps(tied)})


def read_cached_blocks(path: Path, config: ModelConfig) -> nn.Module:
    """The model that `write_cached_blocks` stored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    blocks, tied = json.loads(meta["blocks"]), json.loads(meta["tied"])
    with torch.device("meta"):
        model = build_model(config)
    for name, (fmt, out_features, in_features) in blocks.items():
        if tied and name == "lm_head":
            continue
        parts = PackedBlocks(fmt, out_features, in_features, tensors.pop(f"{name}.q"), tensors.pop(f"{name}.scales"),
                             tensors.pop(f"{name}.mins", None))
        if name == "embed_tokens.linear":
            model.embed_tokens = BlockEmbedding(BlockLinear(parts))
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, BlockLinear(parts))
    if tied:
        model.lm_head = model.embed_tokens.linear
    return finished(model, tensors)


def finished(model: nn.Module, floats: dict[str, torch.Tensor]) -> nn.Module:
    """`model` with its float tensors assigned, checked complete, in eval mode."""
    model.load_state_dict(floats, strict=False, assign=True)
    missing = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise ValueError(f"the GGUF file lacks tensors for {missing[:3]}")
    return model.eval().requires_grad_(False)


def read_gguf_blocks(gguf_path: Path, config: ModelConfig) -> nn.Module:
    """The model of a GGUF file with its block tensors as they are (see the module's docstring)."""
    tensors = GGUFTensors(gguf_path)
    with torch.device("meta"):
        model = build_model(config)
    for i in range(config.num_layers):
        for ours, theirs in PROJECTIONS.items():
            parent, _, attr = ours.format(i=i).rpartition(".")
            layer = blocks_layer(tensors, [f"{name.format(i=i)}.weight" for name in theirs])
            setattr(model.get_submodule(parent), attr, layer)
    embedding = blocks_layer(tensors, ["token_embd.weight"])
    if isinstance(embedding, BlockLinear):
        model.embed_tokens = BlockEmbedding(embedding)
    else:
        model.embed_tokens = nn.Embedding.from_pretrained(embedding.weight, freeze=True)
    if "output.weight" in tensors.tensors:
        model.lm_head = blocks_layer(tensors, ["output.weight"])
    elif isinstance(embedding, BlockLinear):
        model.lm_head = embedding  # tied: the embedding's blocks, shared
    floats = {}
    for ours, theirs in NORMS.items():
        for i in range(config.num_layers) if "{i}" in ours else [None]:
            floats[ours.format(i=i)] = tensors.floats(theirs.format(i=i)).clone()
    return finished(model, floats)
