"""Layers over GGUF's block-quantized weights, kept in their blocks (fused/block_ops.cpp).

A GGUF file's Q4_0, Q4_1 and Q8_0 tensors are groups of 32 values with a float16 scale (and,
for Q4_1, a minimum): `BlockLinear` multiplies float32 activations with them without ever
holding the float32 matrix, and `BlockEmbedding` dequantizes only the rows it looks up. The
values are the float32 model's own (d * q + m is what a GGUF conversion computes), so this is
the float32 model in a quarter (Q8_0) or an eighth (Q4) of the bytes, and a one-token step
streams that much less memory. Q4_0 (d * (q - 8)) is held as Q4_1 with m = -8 d.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import nn

from jupyter_llm.backends.native.fused.ops import fused_ops, unavailable_reason

GROUP = 32
FORMATS = ("Q4_1", "Q8_0")  # how the layers hold their weights (Q4_0 is loaded as Q4_1)
GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # the GGUF tensor types that load as blocks


@dataclass
class Blocks:
    """One matrix [out, in] in blocks: `q` uint8 [out, in / 2] (Q4_1: value j of a group in the
    low nibble of byte j, value j + 16 in its high nibble) or int8 [out, in] (Q8_0); `scales`
    and `mins` (Q4_1 only) float32 [out, in / 32]."""

    format: str
    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.q.shape
        return rows, width * 2 if self.format == "Q4_1" else width

    @classmethod
    def from_gguf(cls, type_name: str, data: np.ndarray, shape: Sequence[int]) -> Blocks:
        """The blocks of a GGUF tensor: `data` is its raw bytes (GGUFReader's tensor.data, one
        row of blocks per output row) and `shape` [out, in]."""
        rows, cols = shape
        if type_name not in GGUF_TYPES:
            raise ValueError(f"GGUF type {type_name} does not load as blocks (accepted: {', '.join(GGUF_TYPES)})")
        if cols % GROUP:
            raise ValueError(f"a {type_name} tensor needs rows of whole groups of 32, got {cols}")
        raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, cols // GROUP, -1)
        scales = torch.from_numpy(raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        if type_name == "Q8_0":
            q = torch.from_numpy(raw[:, :, 2:].copy().view(np.int8).reshape(rows, cols))
            return cls("Q8_0", q, scales)
        if type_name == "Q4_1":
            mins = torch.from_numpy(raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
            q = torch.from_numpy(raw[:, :, 4:].copy().reshape(rows, cols // 2))
            return cls("Q4_1", q, scales, mins)
        # Q4_0: d * (q - 8) = d * q + (-8 d), exact in float32
        q = torch.from_numpy(raw[:, :, 2:].copy().reshape(rows, cols // 2))
        return cls("Q4_1", q, scales, scales * -8.0)

    @classmethod
    def cat(cls, parts: Sequence[Blocks]) -> Blocks:
        """The matrices of `parts` (one format) stacked along the output rows."""
        formats = {part.format for part in parts}
        if len(formats) != 1:
            raise ValueError(f"cannot stack blocks of formats {sorted(formats)}")
        mins = None if parts[0].mins is None else torch.cat([part.mins for part in parts])
        return cls(parts[0].format, torch.cat([part.q for part in parts]),
                   torch.cat([part.scales for part in parts]), mins)

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix (for tests and the layers' reference)."""
        rows, cols = self.shape
        scales = self.scales.repeat_interleave(GROUP, dim=1)
        if self.format == "Q8_0":
            return self.q.float() * scales
        groups = self.q.reshape(rows, cols // GROUP, GROUP // 2)
        values = torch.cat([groups & 0x0F, groups >> 4], dim=2).reshape(rows, cols).float()
        return values * scales + self.mins.repeat_interleave(GROUP, dim=1)


def block_ops() -> ModuleType:
    """The built extension (loaded once), or a clear error when this machine cannot build it."""
    ops = fused_ops()
    if ops is None:
        raise RuntimeError(f"GGUF block weights need the fused CPU ops, which are unavailable here "
                           f"({unavailable_reason()}); load with --quantization none for float32 weights")
    return ops


class BlockLinear(nn.Module):
    """y = x @ W.T (+ b) with W in blocks; float32 activations on the CPU."""

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.format = blocks.format
        self.out_features, self.in_features = blocks.shape
        self.register_buffer("q", blocks.q.contiguous())
        self.register_buffer("scales", blocks.scales.contiguous())
        self.register_buffer("mins", None if blocks.mins is None else blocks.mins.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        block_ops()  # refuse here, not at the first token, where the ops cannot be built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.linear_2d(x.contiguous())
        return self.linear_2d(x.reshape(-1, x.shape[-1]).contiguous()).reshape(*x.shape[:-1], self.out_features)

    def linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        """The product for a contiguous [rows, in_features] float32 x."""
        if self.mins is not None:
            return block_ops().q4_linear(x, self.q, self.scales, self.mins, self.bias)
        return block_ops().q8_linear(x, self.q, self.scales, self.bias)

    def blocks(self) -> Blocks:
        return Blocks(self.format, self.q, self.scales, self.mins)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format} blocks"


class BlockEmbedding(nn.Module):
    """An embedding table in blocks: a lookup dequantizes only the rows it returns. Shares its
    tensors with the tied output layer (`BlockLinear` over the same blocks)."""

    def __init__(self, linear: BlockLinear) -> None:
        super().__init__()
        self.linear = linear
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        flat = ids.reshape(-1).to(torch.int64)
        if lin.format == "Q4_1":
            rows = block_ops().q4_rows(lin.q, lin.scales, lin.mins, flat)
        else:
            rows = block_ops().q8_rows(lin.q, lin.scales, flat)
        return rows.reshape(*ids.shape, self.embedding_dim)
