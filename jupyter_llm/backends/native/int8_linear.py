"""`Int8Linear`: a linear layer in PyTorch's dynamic int8 GEMM (CPU).

Weights are quantized once, per output channel (symmetric int8); activations are quantized
per tensor at run time and the product runs in PyTorch's x86/fbgemm quantized GEMM
(`torch.ops.quantized.linear_dynamic`), which returns float32. It beats a float32 matmul
because the weights take a quarter of the memory traffic. (`torch._weight_int8pack_mm` is
slower than float32 on AVX2 CPUs, so it is not used.) `quant.py` puts these layers in a model.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def select_engine() -> str:
    """Pick PyTorch's x86 quantized engine (fbgemm where x86 is missing)."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            if torch.backends.quantized.engine != engine:
                torch.backends.quantized.engine = engine
            return engine
    raise RuntimeError(f"this PyTorch build has no x86/fbgemm quantized engine (it has {engines}); "
                       "--quantization int8 needs an x86 CPU build of PyTorch")


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W int8 per output channel and x quantized dynamically (uint8, per tensor)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, reduce_range: bool = False) -> None:
        super().__init__()
        weight = weight.detach().float().contiguous()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated" (torch >= 2.10)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, axis=0, dtype=torch.qint8)
        self._pack(qweight, bias)
        # AVX2 without VNNI adds uint8 x int8 products in pairs into saturating int16 sums;
        # 7-bit activations (reduce_range) avoid that, but measured on SmolLM2 the lost bit
        # costs far more (perplexity 24 vs 16) than the rare saturation: 8 bits by default.
        self.reduce_range = reduce_range

    def _pack(self, qweight: torch.Tensor, bias: torch.Tensor | None) -> None:
        select_engine()
        self.out_features, self.in_features = qweight.shape
        self._packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())

    @classmethod
    def from_int8(cls, int8_weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                  reduce_range: bool = False) -> Int8Linear:
        """The layer from its stored parts (`int8_state`): int8 [out, in] and float64 scales [out]."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        zero_points = torch.zeros(int8_weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the same deprecation as in __init__
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(int8_weight.contiguous(), scales.double(),
                                                               zero_points, 0)
        layer._pack(qweight, bias)
        layer.reduce_range = reduce_range
        return layer

    def int8_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 weight [out, in], float64 scales [out], float32 bias or None): what `from_int8` takes."""
        qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"
