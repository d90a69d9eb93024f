"""The transformers backend: an HF model's forward pass driven step by step through the
shared sampler (transformers' `generate` cannot do per-request seeds or presence and
frequency penalties in a batch).

Batching is static: the waiting requests start together as one left-padded batch;
requests that arrive while a batch runs wait for the next batch. Finished rows are
dropped from the KV cache at the next step so they cost nothing.

The KV cache is bounded (`KVBudget`): a request whose own cache could not fit is refused when it
is prepared, and a batch takes only the waiting sequences whose caches fit together, so that a few
long prompts with a large n are an error, not a process the OS kills.
"""
from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.devices import available_memory, resolve_device, torch_dtype
from jupyter_llm.backends.inprocess import InProcessBackend, LogprobEntry, StepEngine
from jupyter_llm.backends.options import BackendOptions, parse_memory
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.errors import ParamError
from jupyter_llm.model_files import ensure_hf_folder, resolve_model
from jupyter_llm.progress import steps
from jupyter_llm.sampling import Sampler
from jupyter_llm.schema import GenerationRequest, PreparedRequest
from jupyter_llm.tokenizers import load_tokenizer

KV_SHARE = 0.8  # of the memory available: the rest for activations, logits and everything else


@dataclass
class HFOptions(BackendOptions):
    device: str = "auto"
    dtype: str = "float32"
    max_num_seqs: int = 32  # rows in one batch
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # Most bytes of KV cache a batch holds: bytes or "1GiB" (default: a share of the memory available)
    kv_cache_memory: int | str | None = None


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """The K and V of one token in every layer, from an HF config (GPT-2's names map onto these)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


@dataclass
class KVBudget:
    """The tokens of KV cache the hf engine may hold: --kv-cache-memory, else a share of the memory
    available now plus what the running batch holds (freed when that batch ends)."""

    bytes_per_token: int
    device: str
    fixed_bytes: int | None = None
    held_tokens: int = 0  # the running batch's bound, kept by the compute thread

    def tokens(self) -> int:
        if self.fixed_bytes is not None:
            return self.fixed_bytes // self.bytes_per_token
        return int(available_memory(self.device) * KV_SHARE) // self.bytes_per_token + self.held_tokens

    def refusal(self, tokens: int) -> str | None:
        """Why `tokens` tokens of cache cannot fit, or None."""
        budget = self.tokens()
        if tokens <= budget:
            return None
        source = "--kv-cache-memory" if self.fixed_bytes is not None else \
            f"{KV_SHARE:.0%} of the memory available on {self.device}"
        return (f"{_mib(tokens * self.bytes_per_token)} MiB of KV cache ({tokens} tokens of "
                f"{self.bytes_per_token} bytes), more than the {_mib(budget * self.bytes_per_token)} MiB "
                f"this backend may use ({source})")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f}"


class HFStepEngine(StepEngine):
    """Static batches over an HF model with a DynamicCache, within a KV budget."""

    def __init__(self, model: PreTrainedModel, max_num_seqs: int, kv: KVBudget, max_model_len: int):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.kv = kv
        self.max_model_len = max_model_len
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
        # a prefill's logits for the last position only: all of them are rows x width x vocab floats
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

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
            self.rows, self.cache, self.kv.held_tokens = [], None, 0
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.attention_mask.device)
            self.cache.batch_select_indices(index)
            self.attention_mask = self.attention_mask[index]
            self.positions = self.positions[index]
            self.rows = [self.rows[i] for i in keep]

    def final_length(self, seq: EngineSequence) -> int:
        return min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)

    def batch_tokens(self, rows: list[EngineSequence]) -> int:
        """The most KV tokens a batch of these rows holds: left-padded to the longest prompt, each
        row grows until the longest-running one ends."""
        width = max(seq.num_prompt_tokens for seq in rows)
        return len(rows) * (width + max(self.final_length(seq) - seq.num_prompt_tokens for seq in rows))

    def _prefill(self) -> torch.Tensor:
        budget = self.kv.tokens()
        rows = [self.waiting.popleft()]  # one alone always fits: prepare refused the rest
        while self.waiting and len(rows) < self.max_num_seqs and self.batch_tokens([*rows, self.waiting[0]]) <= budget:
            rows.append(self.waiting.popleft())
        self.rows, self.kv.held_tokens = rows, self.batch_tokens(rows)
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
                         **{self.cache_argument: self.cache}, **self.last_logits)
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
    capabilities = Capabilities(batching="static", structured=True, devices=("cpu", "cuda"))

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
        fixed = None if options.kv_cache_memory is None else parse_memory(options.kv_cache_memory)
        self.kv = KVBudget(kv_bytes_per_token(model.config, dtype), self.device, fixed)
        self.engine = HFStepEngine(model, options.max_num_seqs, self.kv, self._max_model_len)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Also refuse a request whose own KV cache (n samples of its prompt + max_tokens) cannot fit."""
        prepared = super().prepare(request)
        if prepared is not request:
            params = prepared.params
            length = min(len(prepared.prompt_token_ids) + params.max_tokens, self._max_model_len)
            reason = self.kv.refusal(params.n * length)
            if reason:
                raise ParamError(f"max_tokens x n: this request needs {reason}; lower max_tokens or n")
        return prepared
