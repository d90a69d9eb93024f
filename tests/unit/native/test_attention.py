"""paged_attention against a naive per-sequence causal attention, with scattered block tables."""
from __future__ import annotations

import pytest
import torch

from jupyter_llm.backends.native import attention
from jupyter_llm.backends.native.attention import SHORT_CHUNK, AttentionMetadata, paged_attention, split_decode_groups

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
        ([4, 4, 0, 2], [1, 1, 5, 3], 4, 2),  # decodes first (equal contexts, no mask), then prefills
        ([0, 7, 0], [1, 1, 9], 4, 4),  # a one-token prompt is a decode; fresh prefill is plain causal
        ([0, 9, 3], [20, 18, 6], 4, 2),  # chunks longer than SHORT_CHUNK (SDPA) beside a short one
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

    expected = torch.cat([naive_attention(qq, kk, vv, c, dim**-0.5)
                          for qq, kk, vv, c in zip(qs, full_k, full_v, cached)])
    assert out.shape == (sum(new), heads * dim)
    torch.testing.assert_close(out, expected)
    flat_k = k_cache.view(-1, kv_heads, dim)
    torch.testing.assert_close(flat_k[torch.tensor(slots)], k_new)  # new K written at their slots


def test_metadata_groups_decodes_and_keeps_prefill_chunks_apart():
    decode = AttentionMetadata.build([1, 1], [5, 2], [[3, 1], [0]], [1 * BLOCK, 0 * BLOCK + 1], BLOCK, "cpu")
    assert decode.ordered and not decode.prefills and decode.num_decode == 2
    [group] = decode.decode_groups  # unsorted lengths: one group
    assert group.rows == slice(0, 2) and group.length == 5 and group.tables.tolist() == [3, 1, 0, 0]
    assert group.mask.tolist()[1] == [True, True, False, False, False]
    bias = group.bias(torch.float32, num_kv_heads=2)  # [kv_heads * decodes, 1, length]
    assert bias.shape == (4, 1, 5) and group.bias(torch.float32, num_kv_heads=2) is bias
    assert bias[1, 0].tolist()[:3] == bias[3, 0].tolist()[:3] == [0.0, 0.0, float("-inf")]
    same = AttentionMetadata.build([1, 1], [3, 3], [[3], [0]], [2, 2], BLOCK, "cpu")
    assert same.decode_groups[0].mask is None and same.decode_groups[0].bias(torch.float32) is None

    mixed = AttentionMetadata.build([2, 1, 3], [2, 3, 7], [[0], [1], [4, 5]], [0, 1, 6, 20, 21, 22], BLOCK, "cpu")
    assert not mixed.ordered and mixed.decode_groups[0].rows.tolist() == [2]
    first, second = mixed.prefills
    assert (first.start, first.num_tokens, first.context_len) == (0, 2, 2)
    assert first.mask.tolist() == [[True, False], [True, True]]  # short: causal bias for the bmm path
    assert first.bias(torch.float32, group_size=2).shape == (4, 2)
    long = AttentionMetadata.build([SHORT_CHUNK + 1], [SHORT_CHUNK + 1], [[0, 1, 2, 3, 4]],
                                   list(range(SHORT_CHUNK + 1)), BLOCK, "cpu")
    assert long.prefills[0].mask is None  # a long fresh prefill: is_causal, no mask
    assert (second.start, second.num_tokens, second.context_len) == (3, 3, 7)
    assert second.block_table.tolist() == [4, 5]
    assert second.mask.tolist()[0] == [True] * 5 + [False] * 2  # after a cached prefix of 4


def test_decodes_of_very_different_lengths_split_into_groups(monkeypatch):
    assert split_decode_groups([10, 10, 11]) == [3]  # little padding: one group
    assert split_decode_groups([5, 6, 7, 300, 310], cost=16) == [3, 5]
    lens = [4, 5, 6, 7, 300, 301, 302, 900]
    ends = split_decode_groups(lens, cost=16)
    assert ends[-1] == len(lens) and 1 < len(ends) <= 4 and ends == sorted(ends)
    # The groups through paged_attention equal one padded group.
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, num_blocks, block = 4, 2, 8, 64, 4
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen, dtype=torch.float64)
    ctx = [3, 5, 30, 33, 60]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(-(-c // block))] for c in ctx]
    slots = [t[(c - 1) // block] * block + (c - 1) % block for t, c in zip(tables, ctx)]
    q = torch.randn(len(ctx), heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(len(ctx), kv_heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(len(ctx), kv_heads, dim, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(attention, "GROUP_COST_ROWS", 8)
    meta = AttentionMetadata.build([1] * 5, ctx, tables, slots, block, "cpu")
    assert len(meta.decode_groups) > 1
    out = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.3)
    single = AttentionMetadata.build([1] * 5, ctx[::-1], tables[::-1], slots[::-1], block, "cpu")  # unsorted
    assert len(single.decode_groups) == 1
    expected = paged_attention(q.flip(0), k.flip(0), v.flip(0), k_cache.clone(), v_cache.clone(), single, 0.3)
    torch.testing.assert_close(out, expected.flip(0))
