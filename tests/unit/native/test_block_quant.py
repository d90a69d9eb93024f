"""GGUF block weights (block_quant.py, fused/block_ops.cpp) against float32 references.

Blocks are made by gguf-py's own quantizer (the library that writes GGUF files), so the bytes
are real Q4_0 / Q4_1 / Q8_0 blocks. Tolerances: dequantized values equal gguf-py's exactly;
products, whose activations are quantized to int8 per group of 32 (llama.cpp's Q8_1), agree
with the float32 product to 1% in relative RMS; and a row's result is bitwise the same
whatever rows are computed beside it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from jupyter_llm.backends.native.block_quant import BlockEmbedding, BlockLinear, Blocks
from jupyter_llm.backends.native.fused import ops as fused_module
from jupyter_llm.backends.native.fused.ops import fused_ops

pytestmark = pytest.mark.skipif(fused_ops() is None, reason=f"fused ops not built: {fused_module.unavailable_reason()}")
TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def gguf_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> tuple[Blocks, torch.Tensor]:
    """Blocks of a random matrix quantized by gguf-py, and gguf-py's float32 dequantization."""
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    raw = quantize(values, qtype)
    return Blocks.from_gguf(type_name, raw, (rows, cols)), torch.from_numpy(dequantize(raw, qtype).copy())


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("type_name", TYPES)
def test_blocks_hold_the_values_gguf_writes(type_name):
    blocks, reference = gguf_blocks(type_name, 6, 96)
    assert blocks.shape == (6, 96)
    assert blocks.format == ("Q8_0" if type_name == "Q8_0" else "Q4_1")
    assert torch.equal(blocks.dequantize(), reference)


@pytest.mark.parametrize("type_name", TYPES)
def test_linear_matches_the_float32_product(type_name):
    blocks, weight = gguf_blocks(type_name, 40, 128, seed=1)
    layer = BlockLinear(blocks)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(2))
    assert relative_rms(layer(x), F.linear(x, weight)) < 1e-2
    bias = torch.randn(40)
    with_bias = BlockLinear(blocks, bias)
    assert relative_rms(with_bias(x), F.linear(x, weight, bias)) < 1e-2
    assert layer(x.view(7, 1, 128)).shape == (7, 1, 40)  # leading dimensions are kept


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_a_row_gives_the_same_bits_alone_or_batched(type_name):
    # 10 output columns: the last tile of four is partial; 9 rows: pairs and a single row.
    blocks, _ = gguf_blocks(type_name, 10, 160, seed=3)
    layer = BlockLinear(blocks)
    x = torch.randn(9, 160, generator=torch.Generator().manual_seed(4)) * 5
    batched = layer(x)
    for i in range(9):
        assert torch.equal(layer(x[i : i + 1]), batched[i : i + 1])
    assert torch.equal(layer(x[3:8]), batched[3:8])


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_the_packed_layout_gives_the_blocks_back(type_name):
    # 7 rows (a partial tile of four columns) and 3 groups (padded to an even count)
    blocks, weight = gguf_blocks(type_name, 7, 96, seed=10)
    packed = blocks.pack()
    assert packed.q.shape[0] == 2 and packed.scales.dtype == torch.float16 and packed.scales.shape == (2, 16)
    back = BlockLinear(packed).blocks()
    assert torch.equal(back.q, blocks.q) and torch.equal(back.scales, blocks.scales)
    assert (back.mins is None) == (type_name == "Q8_0") and (back.mins is None or torch.equal(back.mins, blocks.mins))
    assert torch.equal(back.dequantize(), weight)


def test_many_rows_and_a_zero_row():
    blocks, weight = gguf_blocks("Q4_1", 12, 64, seed=5)
    layer = BlockLinear(blocks)
    x = torch.randn(150, 64, generator=torch.Generator().manual_seed(6))  # more than one 64-row chunk
    x[17] = 0.0  # a group of zeros has scale 0: the product is the bias-free zero
    y = layer(x)
    assert relative_rms(y, F.linear(x, weight)) < 1e-2
    assert torch.equal(y[17], torch.zeros(12))
    assert torch.equal(layer(x[140:]), y[140:])


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_embedding_rows_are_the_dequantized_rows(type_name):
    blocks, weight = gguf_blocks(type_name, 20, 64, seed=7)
    embedding = BlockEmbedding(BlockLinear(blocks))
    ids = torch.tensor([[3, 19], [0, 3]])
    assert torch.equal(embedding(ids), weight[ids])
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        embedding(torch.tensor([20]))


def test_stacked_blocks():
    a, wa = gguf_blocks("Q4_1", 4, 64, seed=8)
    b, wb = gguf_blocks("Q4_0", 6, 64, seed=9)  # Q4_0 is held as Q4_1: they stack
    stacked = Blocks.cat([a, b])
    assert torch.equal(stacked.dequantize(), torch.cat([wa, wb]))
    q8, _ = gguf_blocks("Q8_0", 2, 64)
    with pytest.raises(ValueError, match="formats"):
        Blocks.cat([a, q8])


def test_bad_inputs_are_refused_clearly():
    blocks, _ = gguf_blocks("Q4_1", 8, 64)
    layer = BlockLinear(blocks)
    with pytest.raises(RuntimeError, match="x has 32 features, the weights take 64"):
        layer(torch.randn(2, 32))
    with pytest.raises(RuntimeError, match="float32"):
        layer(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not load as blocks"):
        Blocks.from_gguf("Q6_K", np.zeros((8, 210), dtype=np.uint8), (8, 256))
    with pytest.raises(ValueError, match="groups of 32"):
        Blocks.from_gguf("Q8_0", np.zeros((8, 34), dtype=np.uint8), (8, 16))
