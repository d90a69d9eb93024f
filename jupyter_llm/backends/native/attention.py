"""Attention over the paged KV cache for a flat batch of new tokens from several sequences.

One forward computes T new tokens of B sequences, laid out sequence after sequence: a decode
step is 1 token per sequence, a prefill chunk is any number. Per layer, `paged_attention`
writes the new K/V into the pool at their slots, then:

  * the single-token sequences (decodes) attend together: per KV head, their blocks are
    gathered (`index_select`, one copy) into [Bd, S, D] key and value ranges cut to the
    longest of their contexts, and two batched matmuls (`bmm`) with a softmax between them
    compute the attention; the G query heads that share a KV head form the G rows of one
    product, so each key is read once per step (a padding bias, none when all contexts are
    equal). On a CPU this beats `scaled_dot_product_attention` for a decode.
    Decodes of very different lengths are split into a few groups of similar length
    (`split_decode_groups`), so that short contexts are not padded to the longest one;
  * each multi-token chunk (a prefill) attends alone over exactly its own context, causally
    (with a mask only when a cached prefix precedes the chunk), so a 512-token chunk never
    pads the decodes beside it to 512 queries. A short chunk (at most SHORT_CHUNK tokens: a
    speculative verification, the tail of a prompt) takes the decode path's two `bmm`s with a
    causal bias instead of `scaled_dot_product_attention`, whose CPU kernel has a high fixed
    cost per layer even for a few queries.

Everything that depends only on the batch (gather indices, masks) is built once per step in
`AttentionMetadata.build`; masks are turned into additive float biases once per dtype.
The cache tensors are indexed [block, offset, kv_head, dim]; they are fastest stored
head-major (see `KVCachePool`), and work either way.
When the decodes come first in the flat batch and the chunks follow in order (the runner
orders them so), the outputs are simply concatenated.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask -> additive bias (0 where kept, -inf elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


SHORT_CHUNK = 16  # chunks of at most this many tokens attend with bmm (see the module docstring)


@dataclass
class PrefillChunk:
    """A sequence with several new tokens: rows [start, start + num_tokens) of the flat batch."""

    start: int
    num_tokens: int
    context_len: int  # tokens cached before the chunk plus the chunk
    block_table: torch.Tensor  # [blocks covering context_len]
    # [num_tokens, context_len] keep-mask when a cached prefix precedes or the chunk is short; else causal
    mask: torch.Tensor | None
    _biases: dict = field(default_factory=dict, repr=False)

    def bias(self, dtype: torch.dtype, group_size: int = 1) -> torch.Tensor:
        """The additive mask, [num_tokens * group_size, context_len]: each token's row repeated for
        the group_size query heads that share a KV head."""
        key = (dtype, group_size)
        if key not in self._biases:
            self._biases[key] = _bias(self.mask, dtype).repeat_interleave(group_size, dim=0)
        return self._biases[key]


@dataclass
class DecodeGroup:
    """Single-token sequences that attend together, padded to the longest context among them."""

    rows: torch.Tensor | slice  # their rows in the flat batch (a slice when contiguous)
    size: int
    tables: torch.Tensor  # [size * blocks] block ids, row-major, padded with block 0
    length: int  # key positions used: the longest context of the group
    mask: torch.Tensor | None  # [size, length] keep-mask, or None when every context is `length`
    _biases: dict = field(default_factory=dict, repr=False)

    def bias(self, dtype: torch.dtype, num_kv_heads: int = 1) -> torch.Tensor | None:
        """The padding bias, [num_kv_heads * size, 1, length] (KV head major, as `paged_attention`
        batches the rows), or None when there is no padding."""
        if self.mask is None:
            return None
        key = (dtype, num_kv_heads)
        if key not in self._biases:
            bias = _bias(self.mask, dtype).view(1, self.size, 1, self.length)
            self._biases[key] = bias.expand(num_kv_heads, -1, -1, -1).reshape(-1, 1, self.length)
        return self._biases[key]


# Splitting the decodes into groups costs a few ops per layer; it pays when it saves more
# padded key rows than this.
GROUP_COST_ROWS = 128
MAX_DECODE_GROUPS = 8


def split_decode_groups(lengths: Sequence[int], cost: int | None = None,
                        max_groups: int = MAX_DECODE_GROUPS) -> list[int]:
    """For contexts sorted ascending, the end index of each group that minimizes
    sum(group size * its longest context) + cost per group (a small dynamic program)."""
    cost = GROUP_COST_ROWS if cost is None else cost
    n = len(lengths)
    if n < 2 or (lengths[-1] * n - sum(lengths)) <= cost:
        return [n]
    # best[g][j]: least cost of the first j rows in g groups; groups end at a longest context.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            longest = lengths[j - 1]
            for i in range(g - 1, j):
                value = best[g - 1][i] + (j - i) * longest + cost
                if value < best[g][j]:
                    best[g][j], cut[g][j] = value, i
    groups = min(range(1, max_groups + 1), key=lambda g: best[g][n])
    ends, j = [], n
    for g in range(groups, 0, -1):
        ends.append(j)
        j = cut[g][j]
    return ends[::-1]


@dataclass
class AttentionMetadata:
    """Per-step description of the batch, shared by every layer.

    slot_mapping: [T] flat pool slot of each new token (block_id * block_size + offset).
    decode_groups: the single-token sequences, in groups of similar context length (when the
        runner sorted them by length) that each attend in one batched product.
    prefills: the multi-token chunks.
    ordered: decodes first (group after group), then the chunks in order: outputs concatenate.
    """

    slot_mapping: torch.Tensor
    num_tokens: int
    num_decode: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    ordered: bool

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
        decode = [b for b, n in enumerate(query_lens) if n == 1]
        starts, total = [], 0
        for n in query_lens:
            starts.append(total)
            total += n
        prefills = []
        for b, n in enumerate(query_lens):
            if n == 1:
                continue
            ctx = context_lens[b]
            table = torch.tensor(list(block_tables[b][: -(-ctx // block_size)]), device=device)
            mask = None
            if ctx > n or n <= SHORT_CHUNK:  # query i sits at position ctx - n + i
                keys = torch.arange(ctx, device=device)
                mask = keys[None, :] <= (ctx - n + torch.arange(n, device=device))[:, None]
            prefills.append(PrefillChunk(starts[b], n, ctx, table, mask))
        ordered = decode == list(range(len(decode)))
        lens = [context_lens[b] for b in decode]
        # Groups only when the decodes are leading rows sorted by length (the runner's order).
        ends = split_decode_groups(lens) if ordered and lens == sorted(lens) else [len(decode)]
        groups, begin = [], 0
        for end in ends if decode else []:
            members = decode[begin:end]
            group_lens = lens[begin:end]
            length = max(group_lens)
            blocks = -(-length // block_size)
            flat: list[int] = []
            for b in members:
                table = list(block_tables[b][:blocks])
                flat.extend(table + [0] * (blocks - len(table)))
            mask = None
            if min(group_lens) != length:
                mask = torch.arange(length, device=device)[None, :] < torch.tensor(group_lens, device=device)[:, None]
            rows: torch.Tensor | slice = (slice(begin, end) if ordered
                                          else torch.tensor([starts[b] for b in members], device=device))
            groups.append(DecodeGroup(rows, len(members), torch.tensor(flat, device=device), length, mask))
            begin = end
        return cls(
            slot_mapping=torch.tensor(list(slot_mapping), device=device),
            num_tokens=total,
            num_decode=len(decode),
            decode_groups=groups,
            prefills=prefills,
            ordered=ordered,
        )


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, scale: float,
          causal: bool = False) -> torch.Tensor:
    """q: [B, H, n, D]; keys, values: [B, Hkv, S, D] (grouped-query heads share a KV head)."""
    if keys.shape[1] != q.shape[1]:
        if _HAS_ENABLE_GQA:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale, is_causal=causal,
                                                  enable_gqa=True)
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale, is_causal=causal)


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
    group_size = num_heads // num_kv_heads
    k_heads, v_heads = k_cache.permute(2, 0, 1, 3), v_cache.permute(2, 0, 1, 3)  # [Hkv, blocks, offset, D]
    k_heads.flatten(1, 2).index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_heads.flatten(1, 2).index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(v_cache.dtype))

    outs: list[torch.Tensor] = []
    for group in meta.decode_groups:
        batch, length = group.size, group.length
        rows = num_kv_heads * batch
        qd = q[group.rows] if isinstance(group.rows, slice) else q.index_select(0, group.rows)
        # [B, Hkv * G, D] -> [Hkv * B, G, D], pre-scaled
        qd = (qd * scale).view(batch, num_kv_heads, group_size, head_dim).transpose(0, 1)
        qd = qd.reshape(rows, group_size, head_dim)
        keys = k_heads.index_select(1, group.tables).view(rows, -1, head_dim)
        values = v_heads.index_select(1, group.tables).view(rows, -1, head_dim)
        if keys.shape[1] != length:
            keys, values = keys[:, :length], values[:, :length]
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        bias = group.bias(q.dtype, num_kv_heads)
        scores = torch.bmm(qd, keys.transpose(1, 2)) if bias is None else torch.baddbmm(bias, qd, keys.transpose(1, 2))
        out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [Hkv * B, G, D]
        out = out.view(num_kv_heads, batch, group_size * head_dim).transpose(0, 1)
        outs.append(out.reshape(batch, num_heads * head_dim))
    for chunk in meta.prefills:
        n, ctx = chunk.num_tokens, chunk.context_len
        keys = k_heads.index_select(1, chunk.block_table).flatten(1, 2)[:, :ctx]  # [Hkv, ctx, D]
        values = v_heads.index_select(1, chunk.block_table).flatten(1, 2)[:, :ctx]
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if n <= SHORT_CHUNK:
            # [n, Hkv * G, D] -> [Hkv, n * G, D]: the G heads of each token share its KV head's keys.
            qs = (q[chunk.start : chunk.start + n] * scale).view(n, num_kv_heads, group_size, head_dim)
            qs = qs.transpose(0, 1).reshape(num_kv_heads, n * group_size, head_dim)
            scores = torch.baddbmm(chunk.bias(q.dtype, group_size), qs, keys.transpose(1, 2))
            out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [Hkv, n * G, D]
            out = out.view(num_kv_heads, n, group_size * head_dim).transpose(0, 1)
            outs.append(out.reshape(n, num_heads * head_dim))
            continue
        qp = q[chunk.start : chunk.start + n].unsqueeze(0).transpose(1, 2)  # [1, H, n, D]
        bias = None if chunk.mask is None else chunk.bias(q.dtype)
        out = _sdpa(qp, keys.unsqueeze(0), values.unsqueeze(0), bias, scale, causal=chunk.mask is None)
        outs.append(out.transpose(1, 2).reshape(n, num_heads * head_dim))
    if meta.ordered:
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    result = q.new_empty(num_tokens, num_heads * head_dim)
    for group, out in zip(meta.decode_groups, outs):
        result.index_copy_(0, group.rows, out)
    for chunk, out in zip(meta.prefills, outs[len(meta.decode_groups):]):
        result[chunk.start : chunk.start + chunk.num_tokens] = out
    return result
