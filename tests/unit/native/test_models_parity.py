"""Our native models against transformers (and the book's GPT-2) on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from jupyter_llm.backends.native.loader import load_model, load_seed_gpt2

pytest.importorskip("transformers")

KINDS = ["llama_gqa", "llama3_tied", "llama_linear", "gpt2_tied", "gpt2_untied"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_through_chunked_prefill_and_decode(kind, tiny_hf, save_hf, engine_cls):
    hf = tiny_hf(kind)
    model, config = load_model(save_hf(hf), dtype=torch.float32)
    assert config.tie_word_embeddings == (kind in ("llama3_tied", "gpt2_tied"))
    gen = torch.Generator().manual_seed(1)
    final = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (7 + 4, 13 + 3, 5 + 4)]
    prompts = [final[0][:7], final[1][:13], final[2][:5]]
    engine = engine_cls(model, config, num_blocks=32, block_size=4)
    for i, p in enumerate(prompts):
        assert engine.add(i, p) == 0
    ours: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}

    def step(plan):
        for seq_id, logits in engine.step(plan).items():
            ours[seq_id].append(logits)

    step({0: 7, 1: 6, 2: 5})  # sequence 1's prompt is prefilled in two chunks
    for i in (0, 2):
        engine.tokens[i].append(final[i][len(engine.tokens[i])])
    step({1: 7, 0: 1, 2: 1})  # second chunk batched with decode tokens
    while any(len(engine.tokens[i]) < len(final[i]) for i in range(3)):
        plan = {}
        for i in range(3):
            if len(engine.tokens[i]) < len(final[i]):
                engine.tokens[i].append(final[i][len(engine.tokens[i])])
                plan[i] = 1
        step(plan)

    with torch.no_grad():
        for i in range(3):
            expected = hf(torch.tensor([final[i]])).logits[0]
            got = torch.cat(ours[i])
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() < 1e-4, kind


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2_tied"])
def test_greedy_decode_matches_transformers_generate(kind, tiny_hf, save_hf, engine_cls):
    hf = tiny_hf(kind, torch.float64)
    hf.generation_config.eos_token_id = None  # generate exactly 16 tokens
    model, config = load_model(save_hf(hf), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    expected = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())

    engine = engine_cls(model, config, num_blocks=32, block_size=4)
    for i, p in enumerate(prompts):
        engine.add(i, p)
    plan = {i: len(p) for i, p in enumerate(prompts)}
    for _ in range(16):
        for seq_id, logits in engine.step(plan).items():
            engine.tokens[seq_id].append(int(logits[-1].argmax()))
        plan = dict.fromkeys(plan, 1)
    assert [engine.tokens[i][len(p):] for i, p in enumerate(prompts)] == expected


def test_prefix_cache_reuses_blocks_and_matches_recompute(tiny_hf, save_hf, engine_cls):
    model, config = load_model(save_hf(tiny_hf("llama_gqa")))
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(0, config.vocab_size, (8,), generator=gen).tolist()  # 2 blocks of 4
    first = shared + [1, 2, 3]
    second = shared + [4, 5, 6, 7, 8]

    engine = engine_cls(model, config, num_blocks=16, block_size=4)
    engine.add(0, first)
    engine.step({0: len(first)})
    assert engine.add(1, second) == 8
    assert engine.blocks.block_table(1)[:2] == engine.blocks.block_table(0)[:2]
    cached = engine.step({1: len(second) - 8})[1]

    scratch = engine_cls(model, config, num_blocks=16, block_size=4, prefix_caching=False)
    assert scratch.add(0, second) == 0
    full = scratch.step({0: len(second)})[0]
    assert (cached - full[8:]).abs().max().item() < 1e-5
    assert engine.blocks.prefix_cache_hits == 8


# --- The book's GPT-2 ("Build a Large Language Model (From Scratch)"), written here as in the book.

class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (w(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, self.d_out))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1, self.norm2 = LayerNorm(cfg["emb_dim"]), LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(in_idx.shape[1]))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


@pytest.mark.parametrize("qkv_bias,tied", [(False, False), (True, True)])
def test_seed_gpt2_state_dict_matches_book_model(qkv_bias, tied, engine_cls):
    cfg = {"vocab_size": 80, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.1, "qkv_bias": qkv_bias}
    torch.manual_seed(4)
    book = GPTModel(cfg).eval()
    if tied:
        book.out_head.weight = book.tok_emb.weight
    model, config = load_seed_gpt2(book.state_dict(), cfg)
    assert config.tie_word_embeddings == tied
    assert load_model(book.state_dict(), config=cfg)[1] == config

    prompts = [torch.randint(0, 80, (n,)).tolist() for n in (9, 4)]
    engine = engine_cls(model, config, num_blocks=16, block_size=4)
    for i, p in enumerate(prompts):
        engine.add(i, p)
    ours = engine.step({0: 9, 1: 4})
    with torch.no_grad():
        for i, p in enumerate(prompts):
            assert (ours[i] - book(torch.tensor([p]))[0]).abs().max().item() < 1e-4
