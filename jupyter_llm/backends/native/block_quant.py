"""Layers over GGUF's block-quantized weights, kept in their blocks (fused/block_ops.cpp).

A GGUF file's Q4_0, Q4_1 and Q8_0 tensors are groups of 32 values with a float16 scale (and,
for Q4_1, a minimum): `BlockLinear` multiplies float32 activations with them without ever
holding the float32 matrix, and `BlockEmbedding` dequantizes only the rows it looks up. The
values are the float32 model's own (d * q + m is what a GGUF conversion computes), so this is
the float32 model in a quarter (Q8_0) or an eighth (Q4) of the bytes, and a one-token step
streams that much less memory. Q4_0 (d * (q - 8)) is held as Q4_1 with m = -8 d.

`Blocks` is a matrix as GGUF orders it; a layer holds it packed for the kernels
(`PackedBlocks`: output columns in tiles of four, scales as float16 in the kernels' lane order;
see block_ops.cpp), and `PackedBlocks.unpack` gives the `Blocks` back.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import nn

from jupyter_llm.backends.native.fused.ops import fused_ops, unavailable_reason

GROUP = 32
TILE = 4  # output columns per tile of the packed layout
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

    def pack(self) -> PackedBlocks:
        """The kernels' layout: rows padded to whole tiles, groups to an even count (zeros)."""
        rows, cols = self.shape
        groups = cols // GROUP
        padded, tiles, width = groups + groups % 2, -(-rows // TILE), self.q.shape[1] // groups
        q = torch.zeros(tiles * TILE, padded, width, dtype=self.q.dtype)
        q[:rows, :groups] = self.q.reshape(rows, groups, width)
        q = q.view(tiles, TILE, padded, width).transpose(1, 2).reshape(tiles, -1).view(torch.uint8)
        lanes = functools.partial(_to_lanes, self.format, tiles, padded)
        return PackedBlocks(self.format, rows, cols, q.contiguous(), lanes(self.scales),
                            None if self.mins is None else lanes(self.mins))


def _to_lanes(format: str, tiles: int, padded: int, values: torch.Tensor) -> torch.Tensor:
    """Per-group floats [rows, groups] as float16 [tiles, padded / 2 * 8] in lane order: Q4_1
    lane (c & 1) * 4 + e * 2 + (c >> 1), Q8_0 lane e * 4 + c, for column c of a tile and group
    parity e (block_ops.cpp's `lane`). GGUF stores them as float16, so nothing is rounded."""
    rows, groups = values.shape
    full = torch.zeros(tiles * TILE, padded)
    full[:rows, :groups] = values
    halves = full.half()
    if not torch.equal(halves.float(), full):
        raise ValueError("block scales must be float16 values (as GGUF stores them)")
    if format == "Q4_1":  # [tile, c >> 1, c & 1, pair, e] -> [tile, pair, c & 1, e, c >> 1]
        order = halves.view(tiles, 2, 2, padded // 2, 2).permute(0, 3, 2, 4, 1)
    else:  # [tile, c, pair, e] -> [tile, pair, e, c]
        order = halves.view(tiles, TILE, padded // 2, 2).permute(0, 2, 3, 1)
    return order.reshape(tiles, -1).contiguous()


def _from_lanes(format: str, rows: int, groups: int, lanes: torch.Tensor) -> torch.Tensor:
    """The inverse of `_to_lanes`: float32 [rows, groups]."""
    tiles, padded = lanes.shape[0], lanes.shape[1] // 4
    if format == "Q4_1":
        order = lanes.view(tiles, padded // 2, 2, 2, 2).permute(0, 4, 2, 1, 3)
    else:
        order = lanes.view(tiles, padded // 2, 2, TILE).permute(0, 3, 1, 2)
    return order.reshape(tiles * TILE, padded)[:rows, :groups].float()


@dataclass
class PackedBlocks:
    """A `Blocks` matrix in the kernels' layout (`Blocks.pack`): `q` uint8 [tiles, padded groups
    x 4 x bytes per group], `scales` and `mins` (Q4_1) float16 [tiles, padded groups x 4]."""

    format: str
    out_features: int
    in_features: int
    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    def unpack(self) -> Blocks:
        rows, groups = self.out_features, self.in_features // GROUP
        tiles, padded = self.q.shape[0], self.scales.shape[1] // 4
        width = self.q.shape[1] // (padded * TILE)
        q = self.q.view(tiles, padded, TILE, width).transpose(1, 2).reshape(tiles * TILE, padded, width)
        q = q[:rows, :groups].reshape(rows, groups * width)
        q = q.view(torch.int8) if self.format == "Q8_0" else q
        mins = None if self.mins is None else _from_lanes(self.format, rows, groups, self.mins)
        return Blocks(self.format, q.contiguous(), _from_lanes(self.format, rows, groups, self.scales), mins)


def block_ops() -> ModuleType:
    """The built extension (loaded once), or a clear error when this machine cannot build it."""
    ops = fused_ops()
    if ops is None:
        raise RuntimeError(f"GGUF block weights need the fused CPU ops, which are unavailable here "
                           f"({unavailable_reason()}); load with --quantization none for float32 weights")
    return ops


class BlockLinear(nn.Module):
    """y = x @ W.T (+ b) with W in blocks; float32 activations on the CPU."""

    def __init__(self, blocks: Blocks | PackedBlocks, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        packed = blocks.pack() if isinstance(blocks, Blocks) else blocks
        self.format = packed.format
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.register_buffer("q", packed.q)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("mins", packed.mins)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        block_ops()  # refuse here, not at the first token, where the ops cannot be built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.linear_2d(x.contiguous())
        return self.linear_2d(x.reshape(-1, x.shape[-1]).contiguous()).reshape(*x.shape[:-1], self.out_features)

    def linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        """The product for a contiguous [rows, in_features] float32 x."""
        if self.mins is not None:
            return block_ops().q4_linear(x, self.q, self.scales, self.mins, *self.shape, self.bias)
        return block_ops().q8_linear(x, self.q, self.scales, *self.shape, self.bias)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def packed(self) -> PackedBlocks:
        return PackedBlocks(self.format, self.out_features, self.in_features, self.q, self.scales, self.mins)

    def blocks(self) -> Blocks:
        return self.packed().unpack()

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
            rows = block_ops().q4_rows(lin.q, lin.scales, lin.mins, *lin.shape, flat)
        else:
            rows = block_ops().q8_rows(lin.q, lin.scales, *lin.shape, flat)
        return rows.reshape(*ids.shape, self.embedding_dim)
