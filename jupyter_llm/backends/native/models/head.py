"""The vocabulary's two ends, shared by the models: token embeddings in, logits out."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim), left uninitialized on the meta device (where the loaders build
    the models before assigning their weights): a meta tensor's normal_ goes through torch._refs,
    which imports torch._dynamo and sympy, about 40 MB that would stay resident for nothing."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


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
