"""The transformers backend: an HF model's forward pass driven step by step through the
shared sampler (transformers' `generate` cannot do per-request seeds or presence and
frequency penalties in a batch).

Batching is static: the waiting requests start together as one left-padded batch;
requests that arrive while a batch runs wait for the next batch. Finished rows are
dropped from the KV cache at the next step so they cost nothing.
"""
from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.devices import resolve_device, torch_dtype
from jupyter_llm.backends.inprocess import InProcessBackend, LogprobEntry, StepEngine
from jupyter_llm.backends.options import BackendOptions
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.model_files import ensure_hf_folder, resolve_model
from jupyter_llm.progress import steps
from jupyter_llm.sampling import Sampler
from jupyter_llm.tokenizers import load_tokenizer


@dataclass
class HFOptions(BackendOptions):
    device: str = "auto"
    dtype: str = "float32"
    max_num_seqs: int = 32  # rows in one batch
    max_model_len: int | None = None  # default: the model's max_position_embeddings


class HFStepEngine(StepEngine):
    """Static batches over an HF model with a DynamicCache."""

    def __init__(self, model: PreTrainedModel, max_num_seqs: int):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.sampler = Sampler()
        self.waiting: deque[EngineSequence] = deque()
        self.rows: list[EngineSequence] = []  # the running batch, one sequence per cache row
        self.removed: set[int] = set()
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        # transformers 5.x renamed `past_key_values` to `cache`; older versions know only the first.
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def add(self, seq: EngineSequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: EngineSequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif any(row is seq for row in self.rows):
            self.removed.add(seq.seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.seq_id not in self.removed for s in self.rows)

    def counts(self) -> tuple[int, int]:
        return len(self.rows) - len(self.removed), len(self.waiting)

    def stats(self) -> dict[str, Any]:
        return {"batch_size": len(self.rows)}

    def step(self) -> list[tuple[EngineSequence, int, LogprobEntry | None]]:
        with torch.inference_mode():
            self._drop_removed_rows()
            logits = self._prefill() if not self.rows else self._decode()
        sampled = self.sampler(logits, [s.sampling for s in self.rows])
        return list(zip(self.rows, sampled.token_ids, sampled.logprobs))

    def _drop_removed_rows(self) -> None:
        if not self.removed:
            return
        keep = [i for i, s in enumerate(self.rows) if s.seq_id not in self.removed]
        self.removed.clear()
        if not keep:
            self.rows, self.cache = [], None
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.attention_mask.device)
            self.cache.batch_select_indices(index)
            self.attention_mask = self.attention_mask[index]
            self.positions = self.positions[index]
            self.rows = [self.rows[i] for i in keep]

    def _prefill(self) -> torch.Tensor:
        self.rows = [self.waiting.popleft() for _ in range(min(self.max_num_seqs, len(self.waiting)))]
        device = self.model.device
        width = max(len(s.token_ids) for s in self.rows)
        ids = torch.zeros(len(self.rows), width, dtype=torch.long)
        mask = torch.zeros(len(self.rows), width, dtype=torch.long)
        for row, seq in enumerate(self.rows):  # left padding, as model.generate does
            tokens = seq.token_ids
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_argument: self.cache})
        self.attention_mask, self.positions = mask, positions[:, -1:]
        return out.logits[:, -1, :]

    def _decode(self) -> torch.Tensor:
        device = self.attention_mask.device
        last = torch.tensor([[s.token_ids[-1]] for s in self.rows], device=device)  # each row's last sampled token
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(self.rows), 1)], 1)
        self.positions = self.positions + 1
        out = self.model(input_ids=last, attention_mask=self.attention_mask, position_ids=self.positions,
                         use_cache=True, **{self.cache_argument: self.cache})
        return out.logits[:, -1, :]


class HFBackend(InProcessBackend):
    kind = "hf"
    options_class = HFOptions
    capabilities = Capabilities(batching="static", devices=("cpu", "cuda"))

    def load(self, progress: bool = True) -> None:
        options: HFOptions = self.options  # type: ignore[assignment]
        dtype = torch_dtype(options.dtype)
        self.device = resolve_device(options.device)
        spec = resolve_model(self.model_arg)
        self.model_name = spec.name
        self.dtype = options.dtype
        folder = ensure_hf_folder(spec, progress)
        with steps(progress, f"Loading {spec.name} (transformers)", 2) as bar:
            self.tokenizer = load_tokenizer(folder)
            bar.update(1)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(self.device).eval()
            bar.update(1)
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_model_len = min(options.max_model_len or limit, limit)
        self.hf_model = model
        self.engine = HFStepEngine(model, options.max_num_seqs)
