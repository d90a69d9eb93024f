"""A step of a Llama-family model over the fused ops (decode_ops.cpp), one row per token.

Each layer is seven calls: residual add + RMSNorm, the qkv GEMM, RoPE + KV write + paged
attention, the o_proj GEMM, residual add + RMSNorm, the gate_up GEMM, SiLU * up, and the
down_proj GEMM (whose output the next layer's first call adds). The GEMMs are the layers' own
(float32 `F.linear`, fbgemm's int8 in int8_linear.py, or GGUF's blocks in block_quant.py).
Decode tokens, prefill chunks and speculative guesses are all rows: every op but the GEMMs
works row by row, so with row-invariant GEMMs (GGUF's blocks) a token gets the same bits
whatever shares its step. Same numbers as the eager forward in models/llama.py up to float
rounding; `FusedLlamaDecoder.supports` says which models qualify (Llama, float32 activations
on the CPU).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from jupyter_llm.backends.native.block_quant import BlockLinear
from jupyter_llm.backends.native.int8_linear import Int8Linear
from jupyter_llm.backends.native.kv_cache import KVCachePool

Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TokenRows:
    """The tokens of one step, one row each: its position, its pool slot and its sequence (an
    index into `block_tables`, one row of blocks per sequence, padded to the longest)."""

    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64
    row_seqs: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, W] int64

    @classmethod
    def build(cls, starts: Sequence[int], lengths: Sequence[int], slots: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int) -> TokenRows:
        """Sequence i contributes lengths[i] rows at positions starts[i] ...; `slots` is flat."""
        positions = [p for start, n in zip(starts, lengths) for p in range(start, start + n)]
        row_seqs = [i for i, n in enumerate(lengths) for _ in range(n)]
        width = max(-(-(start + n) // block_size) for start, n in zip(starts, lengths))
        tables = [list(t[:width]) + [0] * (width - min(len(t), width)) for t in block_tables]
        return cls(torch.tensor(positions, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64),
                   torch.tensor(row_seqs, dtype=torch.int64), torch.tensor(tables, dtype=torch.int64))


def projection(module: nn.Module) -> Projection:
    """The module's product as a plain function (no nn.Module call machinery per token)."""
    if isinstance(module, Int8Linear):
        packed, reduce_range = module._packed, module.reduce_range
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if isinstance(module, BlockLinear):
        return module.linear_2d  # the kernel call without nn.Module's hooks and reshapes
    return module


class FusedLlamaDecoder:
    """Runs `LlamaForCausalLM`'s steps through the fused ops."""

    def __init__(self, model: nn.Module, ops: ModuleType) -> None:
        self.model = model
        self.ops = ops
        config = model.config
        self.eps = config.norm_eps
        self.num_heads = config.num_heads
        self.scale = config.head_dim**-0.5
        self.layers = [(layer.input_layernorm.weight, projection(layer.self_attn.qkv_proj),
                        projection(layer.self_attn.o_proj), layer.post_attention_layernorm.weight,
                        projection(layer.mlp.gate_up_proj), projection(layer.mlp.down_proj))
                       for layer in model.layers]
        self.final_norm = model.norm.weight
        self.rope_cos, self.rope_sin = model.rope_cos.contiguous(), model.rope_sin.contiguous()

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Llama-family, float32 activations (float32, int8 or block weights), on the CPU."""
        from jupyter_llm.backends.native.models.llama import LlamaForCausalLM

        norm = getattr(model, "norm", None)
        return (isinstance(model, LlamaForCausalLM) and norm is not None
                and norm.weight.dtype == torch.float32 and norm.weight.device.type == "cpu"
                and model.config.head_dim % 2 == 0)

    def hidden(self, input_ids: torch.Tensor, rows: TokenRows, kv_pool: KVCachePool) -> torch.Tensor:
        """The final-norm hidden states [T, hidden] of one step; K/V written into `kv_pool`."""
        ops, eps = self.ops, self.eps
        x = self.model.embed_tokens(input_ids)  # a fresh tensor: the residual stream, updated in place
        delta = None
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up_proj, down_proj) in enumerate(self.layers):
            h = ops.rms_norm(x, norm1, eps) if delta is None else ops.add_rms_norm_(x, delta, norm1, eps)
            attn = ops.token_attention(qkv_proj(h), self.rope_cos, self.rope_sin, rows.positions,
                                       kv_pool.k_heads[i], kv_pool.v_heads[i], rows.slots, rows.block_tables,
                                       rows.row_seqs, self.num_heads, self.scale)
            h = ops.add_rms_norm_(x, o_proj(attn), norm2, eps)
            delta = down_proj(ops.silu_mul(gate_up_proj(h)))
        return ops.add_rms_norm_(x, delta, self.final_norm, eps)
