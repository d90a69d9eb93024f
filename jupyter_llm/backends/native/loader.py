"""Load weights into the native models: HF folders (safetensors or pytorch_model.bin) and state dicts.

HF names are mapped onto our fused modules (q/k/v -> qkv_proj, gate/up -> gate_up_proj, GPT-2
Conv1D weights transposed). `load_seed_gpt2` reads the from-scratch GPT-2 of the book
"Build a Large Language Model (From Scratch)" (see `SEED_GPT2_NAMES` and seed_gpt2.py).
`load_folder` gives a model folder's weights with their tokenizer; `local_folder` finds it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.models import build_model
from jupyter_llm.backends.native.models.llama import interleave_rope_rows
from jupyter_llm.backends.native.seed_gpt2 import TiktokenGPT2, is_seed_gpt2_folder, read_seed_gpt2_folder
from jupyter_llm.model_files import ModelSpec, download_hub_model, ensure_hf_folder
from jupyter_llm.tokenizers import Tokenizer, load_tokenizer

StateDict = Mapping[str, torch.Tensor]

# The book's GPT2Model names -> ours ({i} is the layer index). W_query/W_key/W_value are
# concatenated in that order into qkv_proj; their bias is zero when the book's qkv_bias=False.
# trf_blocks.{i}.att.mask (the causal-mask buffer) is dropped; out_head.weight equal to
# tok_emb.weight means tied embeddings.
SEED_GPT2_NAMES = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "trf_blocks.{i}.norm1.scale": "layers.{i}.ln_1.weight",
    "trf_blocks.{i}.norm1.shift": "layers.{i}.ln_1.bias",
    "trf_blocks.{i}.att.W_query|W_key|W_value.weight": "layers.{i}.attn.qkv_proj.weight",
    "trf_blocks.{i}.att.W_query|W_key|W_value.bias": "layers.{i}.attn.qkv_proj.bias",
    "trf_blocks.{i}.att.out_proj.weight": "layers.{i}.attn.out_proj.weight",
    "trf_blocks.{i}.att.out_proj.bias": "layers.{i}.attn.out_proj.bias",
    "trf_blocks.{i}.norm2.scale": "layers.{i}.ln_2.weight",
    "trf_blocks.{i}.norm2.shift": "layers.{i}.ln_2.bias",
    "trf_blocks.{i}.ff.layers.0.weight": "layers.{i}.mlp.fc_in.weight",
    "trf_blocks.{i}.ff.layers.0.bias": "layers.{i}.mlp.fc_in.bias",
    "trf_blocks.{i}.ff.layers.2.weight": "layers.{i}.mlp.fc_out.weight",
    "trf_blocks.{i}.ff.layers.2.bias": "layers.{i}.mlp.fc_out.bias",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
    "out_head.weight": "lm_head.weight",
}


def load_model(
    source: str | os.PathLike[str] | StateDict,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Load a model from an HF folder (config.json + *.safetensors or pytorch_model*.bin), or from
    a state dict with `config`: an HF config dict for HF names, or the book's config dict for the
    seed GPT-2 layout (recognized by its "tok_emb.weight")."""
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("loading a state dict needs its config dict")
        if "tok_emb.weight" in source:
            return load_seed_gpt2(source, config, dtype, device)
        return _load_hf(source, ModelConfig.from_hf_config(config), dtype, device)
    folder = Path(source)
    weights = _read_weights(folder)
    return _load_hf(weights, ModelConfig.from_folder(folder), dtype, device, consume=True)


def local_folder(spec: ModelSpec, progress: bool) -> Path:
    """The model's folder on this machine (a GGUF file converted once, a hub model downloaded)."""
    return Path(ensure_hf_folder(spec, progress) if spec.kind != "hub" else download_hub_model(spec.path))


def load_folder(folder: Path, dtype: torch.dtype, device: str) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """The model, its config and its tokenizer from an HF folder or the book's GPT-2 folder."""
    if is_seed_gpt2_folder(folder):
        tokenizer = Tokenizer(TiktokenGPT2())  # first: a missing tiktoken fails before the weights load
        state_dict, config_dict = read_seed_gpt2_folder(folder)
        model, config = load_seed_gpt2(state_dict, config_dict, dtype, device)
        return model, config, tokenizer
    tokenizer = load_tokenizer(str(folder))
    model, config = load_model(folder, dtype=dtype, device=device)
    return model, config, tokenizer


def load_seed_gpt2(
    state_dict: StateDict,
    config_dict: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, ModelConfig]:
    """Load the book's GPT2Model state dict; config_dict has the book's keys (vocab_size,
    context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias). LayerNorm eps is 1e-5 and
    GELU the tanh approximation, as in the book."""
    emb, heads = config_dict["emb_dim"], config_dict["n_heads"]
    sd = state_dict
    tied = "out_head.weight" not in sd or torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])
    cfg = ModelConfig(
        architecture="gpt2",
        vocab_size=config_dict["vocab_size"],
        hidden_size=emb,
        num_layers=config_dict["n_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=emb // heads,
        intermediate_size=4 * emb,
        max_position_embeddings=config_dict["context_length"],
        norm_eps=1e-5,
        hidden_act="gelu_tanh",
        tie_word_embeddings=tied,
        bos_token_id=50256,
        eos_token_ids=(50256,),
    )
    ours: dict[str, torch.Tensor] = {}
    for pattern, name in SEED_GPT2_NAMES.items():
        for i in range(cfg.num_layers) if "{i}" in pattern else [None]:
            src, dst = pattern.format(i=i), name.format(i=i)
            if "|" in src:
                prefix, parts, suffix = _split_alternatives(src)
                if suffix == "bias" and not config_dict.get("qkv_bias", False):
                    ours[dst] = torch.zeros(3 * emb)
                else:
                    ours[dst] = torch.cat([sd[f"{prefix}{p}.{suffix}"] for p in parts])
            elif not (src == "out_head.weight" and tied):
                ours[dst] = sd[src]
    return _instantiate(cfg, ours, dtype, device), cfg


def _split_alternatives(name: str) -> tuple[str, list[str], str]:
    """'a.W_query|W_key|W_value.weight' -> ('a.', ['W_query', 'W_key', 'W_value'], 'weight')."""
    head, _, suffix = name.rpartition(".")
    prefix, _, alts = head.rpartition(".")
    return prefix + ".", alts.split("|"), suffix


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                weights.update({k: sf.get_tensor(k) for k in sf.keys()})  # noqa: SIM118 (safe_open is not iterable)
        return weights
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {folder}")
    weights = {}
    for f in files:
        weights.update(torch.load(f, map_location="cpu", weights_only=True))
    return weights


def _load_hf(hf: StateDict, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
             consume: bool = False) -> tuple[nn.Module, ModelConfig]:
    """`consume`: `hf` is ours to empty (the tensors it alone holds are freed before the copies)."""
    convert = _llama_from_hf if cfg.architecture == "llama" else _gpt2_from_hf
    ours = convert(hf, cfg)
    if consume and isinstance(hf, dict):
        hf.clear()
    return _instantiate(cfg, ours, dtype, device), cfg


def _llama_from_hf(hf: StateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM names (model.layers.{i}.self_attn.q_proj.weight, ...) -> ours; q and k
    rows go to interleaved rotary order (see models/llama.py)."""
    sd = {k.removeprefix("model."): v for k, v in hf.items() if "rotary_emb" not in k}
    out = {"embed_tokens.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    params = ["weight", "bias"] if cfg.attention_bias else ["weight"]
    mlp_params = ["weight", "bias"] if cfg.mlp_bias else ["weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = sd[f"{p}{norm}.weight"]
        for w in params:
            q = interleave_rope_rows(sd[f"{p}self_attn.q_proj.{w}"], cfg.num_heads, cfg.head_dim)
            k = interleave_rope_rows(sd[f"{p}self_attn.k_proj.{w}"], cfg.num_kv_heads, cfg.head_dim)
            out[f"{p}self_attn.qkv_proj.{w}"] = torch.cat([q, k, sd[f"{p}self_attn.v_proj.{w}"]])
            out[f"{p}self_attn.o_proj.{w}"] = sd[f"{p}self_attn.o_proj.{w}"]
        for w in mlp_params:
            out[f"{p}mlp.gate_up_proj.{w}"] = torch.cat([sd[f"{p}mlp.gate_proj.{w}"], sd[f"{p}mlp.up_proj.{w}"]])
            out[f"{p}mlp.down_proj.{w}"] = sd[f"{p}mlp.down_proj.{w}"]
    return out


def _gpt2_from_hf(hf: StateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel names (transformer.h.{i}.attn.c_attn.weight, ...) -> ours; Conv1D
    weights are [in, out] and get transposed."""
    sd = {k.removeprefix("transformer."): v for k, v in hf.items()}
    out = {k: sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    conv1d = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
              "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out"}
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        q = f"layers.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{q}{ln}.weight"], out[f"{q}{ln}.bias"] = sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"]
        for theirs, mine in conv1d.items():
            out[f"{q}{mine}.weight"] = sd[f"{p}{theirs}.weight"].t()
            out[f"{q}{mine}.bias"] = sd[f"{p}{theirs}.bias"]
    return out


def _instantiate(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str) -> nn.Module:
    """Build the model without initializing it (meta device), then take `weights` as its parameters."""
    with torch.device("meta"):
        model = build_model(cfg)
    # One tensor at a time, each original dropped once its copy exists: at most one extra tensor is resident.
    owned = {}
    for name in list(weights):
        owned[name] = _owned(weights.pop(name), dtype, device)
    model.load_state_dict(owned, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def _owned(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A contiguous tensor in its own memory. safetensors hands out views into one memory map
    of the whole file, which stays resident while any of them lives: copying the weights we
    keep lets the map (and the pages of the weights that were fused or dropped) go."""
    out = tensor.to(device=device, dtype=dtype)
    if out.data_ptr() == tensor.data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()
