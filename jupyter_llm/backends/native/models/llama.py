"""Llama-family decoder (SmolLM2, Llama 2/3): RoPE, RMSNorm, SwiGLU, grouped-query attention.

Projections are fused (qkv_proj = [q; k; v], gate_up_proj = [gate; up]); the loader
concatenates HF's separate weights and puts the q and k rows of each head in interleaved
rotary order (`interleave_rope_rows`), so that RoPE is one complex multiply for q and k
together. Inputs are a flat batch of new tokens (see attention.py). The forward keeps the
Python work per layer small: at batch 1 on a CPU, op dispatch costs as much as the GEMMs of
an int8 model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jupyter_llm.backends.native.attention import AttentionMetadata, paged_attention
from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.kv_cache import KVCachePool
from jupyter_llm.backends.native.models.head import embedding, vocab_logits


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] with the checkpoint's theta and scaling, as HF computes them."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are divided by factor, short ones kept, the middle band interpolated.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def interleave_rope_rows(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows (output features) of a q or k projection, head by head, from HF's
    rotate-half order (pair i = features i and i + head_dim / 2) to adjacent pairs (2i, 2i + 1).

    Attention scores are dot products of q and k over head_dim, which do not change when q and
    k permute their features the same way; adjacent pairs let RoPE run as one complex multiply.
    """
    rest = weight.shape[1:]
    return weight.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(num_heads * head_dim, *rest)


def apply_rope_interleaved(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] with rotary pairs adjacent; rope: [T, 1, head_dim / 2] complex
    (cos + i sin) for float32/float64, or [T, 1, head_dim / 2, 2] (cos, sin) for half types."""
    if rope.is_complex():
        rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rope
        return torch.view_as_real(rotated).flatten(-2)
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[..., 0], rope[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalize in float32 (or float64), scale by the weight in the input dtype."""
    if x.dtype in (torch.float32, torch.float64) and _HAS_RMS_NORM:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


_HAS_RMS_NORM = hasattr(F, "rms_norm")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    """Fused qkv projection; q and k rows in interleaved rotary order (see `interleave_rope_rows`)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qk_size = q_size + kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope: torch.Tensor, meta: AttentionMetadata,
                kv_pool: KVCachePool) -> torch.Tensor:
        """The attention output before o_proj, [T, q_size]."""
        qkv = self.qkv_proj(x)
        num_tokens, heads = qkv.shape[0], self.num_heads
        # RoPE on q and k together (one op), straight from the fused projection.
        qk = qkv[:, : self.qk_size].view(num_tokens, heads + self.num_kv_heads, self.head_dim)
        qk = apply_rope_interleaved(qk, rope)
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        return paged_attention(qk[:, :heads], qk[:, heads:], v, kv_pool.k[self.layer_idx], kv_pool.v[self.layer_idx],
                               meta, self.scale)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from the fused projection, before down_proj."""
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        return F.silu(gate).mul_(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(x))


def linear_add(proj: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + proj(x), in one GEMM (addmm) for a plain bias-free float Linear."""
    if type(proj) is nn.Linear and proj.bias is None and x.dtype == residual.dtype and x.dim() == 2:
        return torch.addmm(residual, x, proj.weight.t())
    return residual + proj(x)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)
        self.eps = config.norm_eps

    def forward(self, x: torch.Tensor, rope: torch.Tensor, meta: AttentionMetadata,
                kv_pool: KVCachePool) -> torch.Tensor:
        # Few Python-level calls per layer: norms and residual adds inline, o_proj/down_proj fused with the add.
        attn = self.self_attn
        h = attn(rms_norm(x, self.input_layernorm.weight, self.eps), rope, meta, kv_pool)
        x = linear_add(attn.o_proj, h, x)
        mlp = self.mlp
        return linear_add(mlp.down_proj, mlp.act(rms_norm(x, self.post_attention_layernorm.weight, self.eps)), x)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids[T], positions[T], meta, kv_pool) -> hidden [T, H]; compute_logits(hidden) -> [N, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        # float32 cos/sin tables for every position; built on the CPU even under a meta-device
        # context (the loader builds the model there), moved with the model by .to(device).
        freqs = torch.outer(torch.arange(config.max_position_embeddings, device="cpu").float(), rope_inv_freq(config))
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rotation of each position for `apply_rope_interleaved`: complex [T, 1, D/2] for
        float32/float64, (cos, sin) pairs [T, 1, D/2, 2] in `dtype` otherwise."""
        cos = self.rope_cos.index_select(0, positions).unsqueeze(1)
        sin = self.rope_sin.index_select(0, positions).unsqueeze(1)
        if dtype in (torch.float32, torch.float64):
            return torch.complex(cos.to(dtype), sin.to(dtype))
        return torch.stack((cos, sin), dim=-1).to(dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_pool: KVCachePool
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, meta, kv_pool)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # lm_head None: tied embeddings (an int8 or block-quantized lm_head holds its own copy or view)
        return vocab_logits(hidden, self.lm_head, self.embed_tokens.weight if self.lm_head is None else None)
