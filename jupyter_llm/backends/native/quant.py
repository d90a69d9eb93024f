"""Dynamic int8 quantization of the native models' linear layers (CPU).

Weights are quantized once, per output channel (symmetric int8); activations are quantized
per tensor at run time and the product runs in PyTorch's x86/fbgemm quantized GEMM
(`torch.ops.quantized.linear_dynamic`), which returns float32. On an AVX2 CPU this is about
2x faster than a float32 matmul at batch 1 and close to 3x at batch 16-32, because the
weights take a quarter of the memory traffic. (`torch._weight_int8pack_mm` is slower than
float32 on such CPUs, so it is not used.)

Embedding lookups stay float32; the output projection is quantized too (for tied
embeddings, a quantized copy of the embedding matrix becomes the lm_head).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZATIONS = ("int8",)


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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, reduce_range: bool = True) -> None:
        super().__init__()
        select_engine()
        weight = weight.detach().float().contiguous()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated" (torch >= 2.10)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, axis=0, dtype=torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
        # AVX2 without VNNI multiplies uint8 x int8 pairs into saturating int16 sums: 7-bit
        # activations (reduce_range) keep those sums exact.
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a float32 CPU model with Int8Linear, in place, and quantize the
    output projection (tied embeddings get an int8 lm_head of their own). Returns the model."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise ValueError("--quantization int8 runs on the CPU only (PyTorch's quantized linear is a CPU kernel); "
                         "use --device cpu, or --dtype bfloat16/float16 on CUDA")
    if param.dtype != torch.float32:
        raise ValueError("--quantization int8 needs --dtype float32 (activations stay float32)")
    replacements = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in replacements:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear(module.weight, module.bias))
    if getattr(model, "lm_head", "absent") is None:  # tied: quantize a copy of the embedding matrix
        embedding = getattr(model, "embed_tokens", None) or getattr(model, "wte")
        model.lm_head = Int8Linear(embedding.weight)
    return model
