"""The output projection to vocabulary logits, shared by the models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def vocab_logits(hidden: torch.Tensor, lm_head: nn.Module | None, embedding: torch.Tensor | None) -> torch.Tensor:
    """Logits [N, V] from hidden states [N, H]: through `lm_head`, or the tied `embedding` [V, H].

    On a CPU, torch's linear for a few rows against a large vocabulary matrix is slower than the
    same product written weight @ hidden.T, and speculative verification computes such rows."""
    weight = embedding if lm_head is None else getattr(lm_head, "weight", None)
    if type(lm_head) not in (type(None), nn.Linear) or weight is None:  # the int8 head of quant.py
        return lm_head(hidden)
    bias = None if lm_head is None else lm_head.bias
    if hidden.device.type == "cpu" and hidden.shape[0] > 1 and hidden.dtype == torch.float32:
        logits = (weight @ hidden.t()).t().contiguous()
        return logits if bias is None else logits + bias
    return F.linear(hidden, weight, bias)
