"""paged_attention against a naive per-sequence causal attention, with scattered block tables."""
from __future__ import annotations

import pytest
import torch

from jupyter_llm.backends.native.attention import AttentionMetadata, paged_attention

BLOCK = 4


def naive_attention(q, k, v, num_cached, scale):
    """q: [n, H, D] for positions num_cached..; k, v: [num_cached + n, Hkv, D] (whole context)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(num_cached, num_cached + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).flatten(1)


@pytest.mark.parametrize(
    "cached,new,heads,kv_heads",
    [
        ([0, 5, 9], [6, 3, 1], 4, 2),  # mixed: fresh prefill, chunk after cache, decode
        ([3, 8, 0, 12], [1, 1, 1, 1], 4, 1),  # pure decode, MQA
        ([6], [7], 2, 2),  # one sequence, prefill after a cached prefix
    ],
)
def test_paged_attention_matches_naive(cached, new, heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    dim, num_blocks = 8, 32
    k_cache = torch.zeros(num_blocks, BLOCK, kv_heads, dim, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous tables
    tables, slots, full_k, full_v, qs = [], [], [], [], []
    for c, n in zip(cached, new):
        total = c + n
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        tables.append(table)
        kk = torch.randn(total, kv_heads, dim, generator=gen, dtype=torch.float64)
        vv = torch.randn(total, kv_heads, dim, generator=gen, dtype=torch.float64)
        for p in range(c):  # the already-cached part lives in the pool
            k_cache[table[p // BLOCK], p % BLOCK] = kk[p]
            v_cache[table[p // BLOCK], p % BLOCK] = vv[p]
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, total)]
        full_k.append(kk)
        full_v.append(vv)
        qs.append(torch.randn(n, heads, dim, generator=gen, dtype=torch.float64))

    meta = AttentionMetadata.build(new, [c + n for c, n in zip(cached, new)], tables, slots, BLOCK, "cpu")
    q = torch.cat(qs)
    k_new = torch.cat([kk[c:] for kk, c in zip(full_k, cached)])
    v_new = torch.cat([vv[c:] for vv, c in zip(full_v, cached)])
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale=dim**-0.5)

    expected = torch.cat([naive_attention(qq, kk, vv, c, dim**-0.5) for qq, kk, vv, c in zip(qs, full_k, full_v, cached)])
    assert out.shape == (sum(new), heads * dim)
    torch.testing.assert_close(out, expected)
    flat_k = k_cache.view(-1, kv_heads, dim)
    torch.testing.assert_close(flat_k[torch.tensor(slots)], k_new)  # new K written at their slots


def test_metadata_uses_reshape_when_all_sequences_have_equal_query_length():
    decode = AttentionMetadata.build([1, 1], [5, 2], [[3, 1], [0]], [1 * BLOCK, 0 * BLOCK + 1], BLOCK, "cpu")
    assert decode.q_gather is None and decode.q_scatter is None
    assert decode.attn_mask.shape == (2, 1, 1, 2 * BLOCK)
    assert decode.attn_mask[1, 0, 0].tolist() == [True, True] + [False] * 6
    mixed = AttentionMetadata.build([2, 1], [2, 3], [[0], [1]], [0, 1, 6], BLOCK, "cpu")
    assert mixed.q_gather.tolist() == [0, 1, 2, 2]
    assert mixed.q_scatter.tolist() == [0, 1, 2]
