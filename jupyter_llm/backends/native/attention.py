"""Attention over the paged KV cache for a flat batch of new tokens from several sequences.

One forward computes T new tokens of B sequences, laid out sequence after sequence: a decode
step is 1 token per sequence, a prefill chunk is any number. Per layer, `paged_attention`
writes the new K/V into the pool at their slots, then gathers every sequence's blocks into a
padded [B, max_blocks * block_size] key range and runs one masked
`scaled_dot_product_attention` for the whole batch. Everything that depends only on the batch
(padding indices, the mask) is built once per step in `AttentionMetadata.build`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class AttentionMetadata:
    """Per-step description of the batch, shared by every layer.

    slot_mapping: [T] flat pool slot of each new token (block_id * block_size + offset).
    block_tables: [B, max_blocks] each sequence's block ids, padded with 0.
    attn_mask: [B, 1, max_q, max_blocks * block_size] True where the query may attend the key.
    q_gather: [B * max_q] index of each padded query row in the flat batch, or None when every
        sequence has max_q new tokens (decode, or a single sequence) and a reshape suffices.
    q_scatter: [T] row of each new token in the padded [B * max_q] layout, or None likewise.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    attn_mask: torch.Tensor
    max_q: int
    q_gather: torch.Tensor | None
    q_scatter: torch.Tensor | None

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        slot_mapping: Sequence[int],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """query_lens[b]: new tokens of sequence b this step; context_lens[b]: its tokens cached
        before this step plus the new ones; slot_mapping: the slots of all T new tokens."""
        batch, max_q = len(query_lens), max(query_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([list(t) + [0] * (max_blocks - len(t)) for t in block_tables], device=device)
        ctx = torch.tensor(context_lens, device=device)
        qlen = torch.tensor(query_lens, device=device)
        # Query i of sequence b sits at position ctx - qlen + i and sees keys up to there.
        # Padding rows (i >= qlen) are clamped to the last real position so that no row is empty.
        rows = torch.arange(max_q, device=device)
        q_pos = torch.minimum(ctx[:, None] - qlen[:, None] + rows, ctx[:, None] - 1)  # [B, max_q]
        keys = torch.arange(max_blocks * block_size, device=device)
        mask = (keys[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)
        q_gather = q_scatter = None
        if batch * max_q != len(slot_mapping):
            starts = torch.cumsum(qlen, 0) - qlen
            q_gather = (starts[:, None] + torch.minimum(rows, qlen[:, None] - 1)).flatten()
            q_scatter = (torch.arange(batch, device=device) * max_q).repeat_interleave(qlen) + (
                torch.arange(len(slot_mapping), device=device) - starts.repeat_interleave(qlen)
            )
        return cls(
            slot_mapping=torch.tensor(slot_mapping, device=device),
            block_tables=tables,
            attn_mask=mask,
            max_q=max_q,
            q_gather=q_gather,
            q_scatter=q_scatter,
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D]; k_cache, v_cache: one layer of the pool,
    [num_blocks, block_size, Hkv, D]. Writes k, v at meta.slot_mapping; returns [T, H * D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    batch, max_q = meta.block_tables.shape[0], meta.max_q
    if meta.q_gather is not None:
        q = q[meta.q_gather]
    q = q.view(batch, max_q, num_heads, head_dim).transpose(1, 2)
    keys = k_cache[meta.block_tables].view(batch, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
    values = v_cache[meta.block_tables].view(batch, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
    if num_kv_heads == num_heads:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.attn_mask, scale=scale)
    elif _HAS_ENABLE_GQA:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.attn_mask, scale=scale, enable_gqa=True)
    else:
        group = num_heads // num_kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.attn_mask, scale=scale)
    out = out.transpose(1, 2).reshape(batch * max_q, num_heads * head_dim)
    return out if meta.q_scatter is None else out[meta.q_scatter]
