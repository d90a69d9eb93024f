"""Dynamic int8 quantization of the native models' linear layers (CPU): every nn.Linear
becomes an `Int8Linear` (see int8_linear.py).

Embedding lookups stay float32; the output projection is quantized too (for tied
embeddings, a quantized copy of the embedding matrix becomes the lm_head).

Accuracy. One activation scale per tensor is hurt by outlier channels; the worst are the
inputs of a SwiGLU model's down_proj (silu(gate) * up), which on SmolLM2 raised perplexity
from 13.0 to 46 on its own. Before quantizing, `smooth_swiglu` therefore moves that range
into the weights (SmoothQuant, Xiao et al. 2023): the up rows are divided and the down_proj
columns multiplied by a per-channel factor from a short calibration pass, which leaves the
float32 model's output unchanged. With that and full 8-bit activations, SmolLM2's
perplexity on a fixed paragraph went from 46 to 16 (measured, float32 13.0).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jupyter_llm.backends.native.int8_linear import Int8Linear
from jupyter_llm.backends.native.model_runner import prefill_logits


def quantize_int8(model: nn.Module, calibration_ids: list[int] | None = None) -> nn.Module:
    """Replace every nn.Linear of a float32 CPU model with Int8Linear, in place, and quantize the
    output projection (tied embeddings get an int8 lm_head of their own). With
    `calibration_ids` (a few hundred tokens of varied text), SwiGLU MLPs are smoothed first
    (`smooth_swiglu`). Returns the model."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise ValueError("--quantization int8 runs on the CPU only (PyTorch's quantized linear is a CPU kernel); "
                         "use --device cpu, or --dtype bfloat16/float16 on CUDA")
    if param.dtype != torch.float32:
        raise ValueError("--quantization int8 needs --dtype float32 (activations stay float32)")
    if calibration_ids:
        smooth_swiglu(model, calibration_ids)
    replacements = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in replacements:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear(module.weight, module.bias))
    if getattr(model, "lm_head", "absent") is None:  # tied: quantize a copy of the embedding matrix
        embedding = getattr(model, "embed_tokens", None) or model.wte
        model.lm_head = Int8Linear(embedding.weight)
    return model


# Varied text (prose, code, a list, numbers) for the calibration pass of `smooth_swiglu`.
CALIBRATION_TEXT = """The Industrial Revolution transformed economies based on agriculture and handicrafts into
economies based on large-scale industry. Photosynthesis lets plants turn sunlight, water and
carbon dioxide into sugar and oxygen.

def fibonacci(n: int) -> int:
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)

Shopping list: 3 apples, 2 loaves of bread, 1 litre of milk (total: 7.45 EUR).
Q: What is the capital of Italy? A: Rome. Once upon a time, an old fisherman told stories
to the children of the village every evening, and they listened until the stars came out."""


@torch.inference_mode()
def smooth_swiglu(model: nn.Module, calibration_ids: list[int], alpha: float = 0.7) -> None:
    """SmoothQuant for the down_proj inputs of a SwiGLU MLP: with m_j the largest |input| of
    channel j over the calibration tokens and w_j the largest |weight| of down_proj column j,
    s_j = m_j^alpha / w_j^(1 - alpha); up rows are divided by s and down_proj columns multiplied
    by it. silu(gate) * up / s then has a flatter range, and the float32 product is unchanged.
    Models without SwiGLU MLPs (GPT-2) are left alone."""
    mlps = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    if not mlps:
        return
    maxima: dict[nn.Module, torch.Tensor] = {}

    def record(mlp: nn.Module) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            size = mlp.intermediate_size
            h = F.silu(out[:, :size]) * out[:, size:]
            maxima[mlp] = torch.maximum(maxima.get(mlp, torch.zeros(size)), h.abs().amax(dim=0))
        return hook

    hooks = [mlp.gate_up_proj.register_forward_hook(record(mlp)) for mlp in mlps]
    try:
        prefill_logits(model, model.config, calibration_ids, fused=False)  # the hooks need module calls
    finally:
        for hook in hooks:
            hook.remove()
    for mlp in mlps:
        size = mlp.intermediate_size
        weight_max = mlp.down_proj.weight.abs().amax(dim=0).clamp(min=1e-5)
        scale = (maxima[mlp].clamp(min=1e-5) ** alpha / weight_max ** (1 - alpha)).clamp(min=1e-5)
        mlp.gate_up_proj.weight[size:] /= scale[:, None]
        if mlp.gate_up_proj.bias is not None:
            mlp.gate_up_proj.bias[size:] /= scale
        mlp.down_proj.weight *= scale[None, :]
