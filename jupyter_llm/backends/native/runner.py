"""`ModelRunner`: turns one scheduled step (a list of `StepItem`s) into tensors, runs the model, returns logits."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionMetadata
from .config import ModelConfig
from .kv_cache import KVCachePool


@dataclass
class StepItem:
    """One sequence's share of a step: compute `token_ids`, which sit at positions
    [start_pos, start_pos + len(token_ids)); the first start_pos tokens already have K/V in the
    blocks of `block_table`. `slot_mapping` gives the pool slot of each new token
    (`BlockManager.slot_mapping(seq_id, start_pos, start_pos + len(token_ids))`)."""

    seq_id: int
    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    slot_mapping: Sequence[int]


class ModelRunner:
    """Runs the model over a batch that mixes decode tokens and prefill chunks of several sequences."""

    def __init__(self, model: nn.Module, config: ModelConfig, kv_pool: KVCachePool) -> None:
        self.model = model
        self.config = config
        self.kv_pool = kv_pool
        self.device = kv_pool.k.device

    @torch.inference_mode()
    def run(self, batch: Sequence[StepItem], all_logits: bool = False) -> torch.Tensor:
        """Compute one step; return logits (float32, or float64 for a float64 model) of the last new token of each item, [B, V]
        (for an item that is a mid-prompt chunk the caller ignores its row). With all_logits,
        return the logits of every new token instead, [T, V] in batch order (speculative
        verification uses this)."""
        query_lens = [len(item.token_ids) for item in batch]
        positions: list[int] = []
        input_ids: list[int] = []
        slots: list[int] = []
        for item, n in zip(batch, query_lens):
            input_ids.extend(item.token_ids)
            positions.extend(range(item.start_pos, item.start_pos + n))
            slots.extend(item.slot_mapping)
        meta = AttentionMetadata.build(
            query_lens=query_lens,
            context_lens=[item.start_pos + n for item, n in zip(batch, query_lens)],
            block_tables=[item.block_table for item in batch],
            slot_mapping=slots,
            block_size=self.kv_pool.block_size,
            device=self.device,
        )
        ids = torch.tensor(input_ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        hidden = self.model(ids, pos, meta, self.kv_pool)
        if not all_logits and len(batch) != len(input_ids):
            last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
            hidden = hidden[last]
        logits = self.model.compute_logits(hidden)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))
