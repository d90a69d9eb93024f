"""GPT-2-family decoder: learned positions, pre-LayerNorm blocks, GELU MLP, fused qkv.

Weights are nn.Linear ([out, in]); the loader transposes HF GPT-2's Conv1D ([in, out]) weights.
Inputs are a flat batch of new tokens (see attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jupyter_llm.backends.native.attention import AttentionMetadata, paged_attention
from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.kv_cache import KVCachePool
from jupyter_llm.backends.native.models.head import embedding, vocab_logits


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_pool: KVCachePool) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        out = paged_attention(q, k, v, kv_pool.k[self.layer_idx], kv_pool.v[self.layer_idx], meta, self.scale)
        return self.out_proj(out)


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_pool: KVCachePool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta, kv_pool)
        return x + self.mlp(self.ln_2(x))


class GPT2ForCausalLM(nn.Module):
    """forward(input_ids[T], positions[T], meta, kv_pool) -> hidden [T, H]; compute_logits(hidden) -> [N, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = embedding(config.vocab_size, config.hidden_size)
        self.wpe = embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_pool: KVCachePool
    ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for layer in self.layers:
            x = layer(x, meta, kv_pool)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return vocab_logits(hidden, self.lm_head, self.wte.weight)  # lm_head None: tied embeddings
