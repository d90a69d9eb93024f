"""The fused ops (fused/decode_ops.cpp) against PyTorch, and the runner's choice of path.

Tolerances: float32 against float32 references computed by PyTorch in another order, so
agreement to 1e-5 relative (norms, SiLU) and 1e-5 absolute on unit-scale attention outputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jupyter_llm.backends.native.attention import AttentionMetadata, paged_attention
from jupyter_llm.backends.native.fused import ops as fused_module
from jupyter_llm.backends.native.fused.decode import TokenRows
from jupyter_llm.backends.native.fused.ops import fused_ops
from jupyter_llm.backends.native.loader import load_model
from jupyter_llm.backends.native.models.llama import apply_rope_interleaved

ops = fused_ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"fused ops not built: {fused_module.unavailable_reason()}")


def test_rms_norm_and_residual_add_match_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=gen) * 3
    delta = torch.randn(5, 96, generator=gen)
    w = torch.randn(96, generator=gen)
    expected = F.rms_norm(x, (96,), w, 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), expected, rtol=1e-5, atol=1e-5)
    residual = x.clone()
    out = ops.add_rms_norm_(residual, delta, w, 1e-6)
    torch.testing.assert_close(residual, x + delta)  # the residual stream is updated in place
    torch.testing.assert_close(out, F.rms_norm(x + delta, (96,), w, 1e-6), rtol=1e-5, atol=1e-5)


def test_silu_mul_matches_torch():
    gate_up = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(1)) * 4
    expected = F.silu(gate_up[:, :40]) * gate_up[:, 40:]
    torch.testing.assert_close(ops.silu_mul(gate_up), expected, rtol=1e-5, atol=1e-6)


def test_ops_refuse_other_dtypes():
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-5)


# (cached tokens, new tokens) per sequence: decodes (one new token) first, as the eager path orders them.
@pytest.mark.parametrize("heads,kv_heads,items", [
    (4, 2, [(0, 1), (5, 1), (12, 1)]),
    (6, 3, [(8, 1)]),
    (2, 2, [(3, 1), (3, 1), (16, 1), (1, 1)]),
    (4, 2, [(6, 1), (0, 7)]),  # a decode beside a whole prompt
    (6, 3, [(2, 1), (9, 4), (5, 6)]),  # chunks after a cached prefix (and speculative guesses)
])
def test_token_attention_matches_eager_paged_attention(heads, kv_heads, items):
    """RoPE at each position, K/V written at the slots, causal attention over scattered blocks
    (a chunk's rows see each other): the same outputs and the same pool as the eager path."""
    gen = torch.Generator().manual_seed(2)
    dim, block, num_blocks, positions_max = 8, 4, 32, 64
    k_heads = torch.randn(kv_heads, num_blocks, block, dim, generator=gen)  # history: random
    v_heads = torch.randn(kv_heads, num_blocks, block, dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    contexts = [cached + new for cached, new in items]
    tables = [[free.pop() for _ in range(-(-n // block))] for n in contexts]
    positions = [p for cached, new in items for p in range(cached, cached + new)]
    slots = [t[p // block] * block + p % block for t, (cached, new) in zip(tables, items)
             for p in range(cached, cached + new)]
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * dim, generator=gen)
    freqs = torch.outer(torch.arange(positions_max).float(), torch.rand(dim // 2, generator=gen))
    cos, sin = freqs.cos(), freqs.sin()

    k_ref, v_ref = k_heads.clone(), v_heads.clone()
    rope = torch.complex(cos, sin)[torch.tensor(positions)].unsqueeze(1)
    qk = apply_rope_interleaved(qkv[:, : (heads + kv_heads) * dim].view(-1, heads + kv_heads, dim), rope)
    v = qkv[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
    meta = AttentionMetadata.build([new for _, new in items], contexts, tables, slots, block, "cpu")
    expected = paged_attention(qk[:, :heads], qk[:, heads:], v, k_ref.permute(1, 2, 0, 3), v_ref.permute(1, 2, 0, 3),
                               meta, dim**-0.5)

    rows = TokenRows.build([cached for cached, _ in items], [new for _, new in items], slots, tables, block)
    got = ops.token_attention(qkv, cos, sin, rows.positions, k_heads, v_heads, rows.slots, rows.block_tables,
                              rows.row_seqs, heads, dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_heads, k_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_heads, v_ref)


def test_token_attention_gives_a_row_the_same_bits_alone_or_in_a_chunk():
    """A prompt's rows computed as one chunk, then again one token at a time as decodes: bitwise equal."""
    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, block, n = 4, 2, 16, 4, 11
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=gen)
    freqs = torch.outer(torch.arange(32).float(), torch.rand(dim // 2, generator=gen))
    cos, sin = freqs.cos(), freqs.sin()
    table = [5, 2, 7]
    slots = [table[p // block] * block + p % block for p in range(n)]
    caches = [torch.zeros(kv_heads, 8, block, dim) for _ in range(4)]
    whole = TokenRows.build([0], [n], slots, [table], block)
    chunk = ops.token_attention(qkv, cos, sin, whole.positions, caches[0], caches[1], whole.slots,
                                whole.block_tables, whole.row_seqs, heads, dim**-0.5)
    alone = []
    for p in range(n):
        one = TokenRows.build([p], [1], slots[p : p + 1], [table], block)
        alone.append(ops.token_attention(qkv[p : p + 1], cos, sin, one.positions, caches[2], caches[3], one.slots,
                                         one.block_tables, one.row_seqs, heads, dim**-0.5))
    assert torch.equal(chunk, torch.cat(alone))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_runner_takes_the_fused_path_only_where_it_applies(tiny_hf, save_hf, engine_cls):
    llama, _ = load_model(save_hf(tiny_hf("llama_gqa")), dtype=torch.float32)
    assert engine_cls(llama, llama.config).runner.fused is not None
    from jupyter_llm.backends.native.model_runner import build_runner

    runner, _ = build_runner(llama, llama.config, 8, 4, True, fused=False)  # --no-fused-ops
    assert runner.fused is None
    wide, _ = load_model(save_hf(tiny_hf("llama_gqa", torch.float64)), dtype=torch.float64)
    assert engine_cls(wide, wide.config).runner.fused is None  # float64: the eager path
    gpt2, _ = load_model(save_hf(tiny_hf("gpt2_tied")), dtype=torch.float32)
    assert engine_cls(gpt2, gpt2.config).runner.fused is None


def test_fused_decode_logits_match_the_eager_path(tiny_hf, save_hf, engine_cls):
    """Several sequences of different lengths, decoded together for a few steps, with and
    without the fused ops: the same logits (and so the same greedy tokens)."""
    model, config = load_model(save_hf(tiny_hf("llama3_tied")), dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (3, 11, 6)]
    runs = []
    for fused in (True, False):
        engine = engine_cls(model, config, num_blocks=32, block_size=4)
        if not fused:
            engine.runner.fused = None
        for i, p in enumerate(prompts):
            engine.add(i, p)
        plan, logits = {i: len(p) for i, p in enumerate(prompts)}, []
        for _ in range(8):
            for seq_id, rows in engine.step(plan).items():
                logits.append(rows[-1])
                engine.tokens[seq_id].append(int(rows[-1].argmax()))
            plan = dict.fromkeys(plan, 1)
        runs.append((torch.stack(logits), dict(engine.tokens)))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-4)
    assert runs[0][1] == runs[1][1]


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(fused_module.DISABLE_ENV, "0")
    fused_module._load.cache_clear()
    try:
        assert fused_module.fused_ops() is None
        assert fused_module.unavailable_reason() == f"{fused_module.DISABLE_ENV}=0"
    finally:
        monkeypatch.delenv(fused_module.DISABLE_ENV)
        fused_module._load.cache_clear()
    assert fused_module.fused_ops() is not None
