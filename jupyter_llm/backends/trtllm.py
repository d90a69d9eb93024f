"""The trtllm backend: TensorRT-LLM's `LLM` in this process (NVIDIA GPU), from a Hugging Face
model or a built engine directory.

`llm.generate_async(prompt, sampling_params, streaming=True)` yields cumulative
RequestOutputs (`OutputTracker` turns them into delta events); `abort()` on the result
cancels the request. TensorRT-LLM samples and matches stop strings itself: every
SamplingParams field maps to TensorRT-LLM's field of the same name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from ..params import GenerationRequest, ParamError, SamplingParams, TokenEvent
from ..tokens import Tokenizer
from .base import Backend, BackendOptions, Capabilities
from .gpu_engine import OutputTracker, TokenizerServices, availability, build_outside_loop, stream_events
from .rate import TokenMeter

INSTALL_HINT = "pip install 'jupyter-llm[trtllm]'"


@dataclass
class TRTLLMOptions(BackendOptions):
    tensor_parallel_size: int = 1
    enable_block_reuse: bool = True  # KV cache reuse across requests (prefix caching)
    free_gpu_memory_fraction: float = 0.9  # of the free GPU memory, for the KV cache
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    dtype: str = "auto"
    tokenizer: str | None = None  # for an engine directory without tokenizer files


def llm_kwargs(model: str, options: TRTLLMOptions) -> dict[str, Any]:
    """tensorrt_llm.LLM keyword arguments, except kv_cache_config (see kv_cache_kwargs)."""
    if options.tensor_parallel_size < 1:
        raise ParamError(f"--tensor-parallel-size must be >= 1, got {options.tensor_parallel_size}")
    kwargs: dict[str, Any] = {"model": model, "tensor_parallel_size": options.tensor_parallel_size,
                              "dtype": options.dtype}
    for name in ("max_batch_size", "max_num_tokens", "max_seq_len", "tokenizer"):
        if getattr(options, name) is not None:
            kwargs[name] = getattr(options, name)
    return kwargs


def kv_cache_kwargs(options: TRTLLMOptions) -> dict[str, Any]:
    if not 0 < options.free_gpu_memory_fraction <= 1:
        raise ParamError(f"--free-gpu-memory-fraction must be in (0, 1], got {options.free_gpu_memory_fraction}")
    return {"enable_block_reuse": options.enable_block_reuse,
            "free_gpu_memory_fraction": options.free_gpu_memory_fraction}


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """tensorrt_llm.SamplingParams keyword arguments, field by field (None leaves a filter off)."""
    return {"n": params.n, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k or None, "min_p": params.min_p or None,
            "repetition_penalty": params.repetition_penalty, "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty, "seed": params.seed, "stop": list(params.stop) or None,
            "ignore_eos": params.ignore_eos, "logprobs": params.logprobs}


def context_length(folder: str) -> int | None:
    """The context of an HF folder (max_position_embeddings) or a built engine (build_config.max_seq_len)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("max_position_embeddings") or (data.get("build_config") or {}).get("max_seq_len")


class TRTLLMBackend(TokenizerServices, Backend):
    kind = "trtllm"
    description = "TensorRT-LLM in process (NVIDIA GPU): HF models or built engines, in-flight batching"
    install_hint = INSTALL_HINT
    options_class = TRTLLMOptions
    capabilities = Capabilities(batching="continuous", devices=("cuda",))

    def __init__(self, model: str | None = None, **options: Any):
        super().__init__(model, **options)
        self.meter = TokenMeter()
        self.llm: Any = None

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return availability("tensorrt_llm", INSTALL_HINT)

    def load(self, progress: bool = True) -> None:
        from ..models import ensure_hf_folder, resolve_model
        from .hf import load_tokenizer

        options: TRTLLMOptions = self.options  # type: ignore[assignment]
        spec = resolve_model(self.model_arg)
        path = ensure_hf_folder(spec, progress)
        kwargs, kv = llm_kwargs(path, options), kv_cache_kwargs(options)

        def build() -> Any:
            from tensorrt_llm import LLM
            from tensorrt_llm.llmapi import KvCacheConfig

            return LLM(kv_cache_config=KvCacheConfig(**kv), **kwargs)

        self.llm = build_outside_loop(build)
        self.tokenizer: Tokenizer = load_tokenizer(options.tokenizer or path)
        self.model_name = spec.name
        self.dtype = options.dtype
        self.device = f"cuda x{options.tensor_parallel_size}"
        self._max_model_len = int(options.max_seq_len or getattr(getattr(self.llm, "args", None), "max_seq_len", None)
                                  or context_length(path) or 2048)
        self.capabilities = Capabilities(batching="continuous", prefix_cache=options.enable_block_reuse,
                                         devices=("cuda",))

    async def stop(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from tensorrt_llm import SamplingParams as TRTSamplingParams

        self.check_request(request)
        prompt_ids = self.prompt_ids_within_context(request)
        p = request.params
        tracker = OutputTracker(request.id, p.n, p.logprobs or 0, p.logprobs is not None)
        result = self.llm.generate_async(prompt_ids, sampling_params=TRTSamplingParams(**sampling_kwargs(p)),
                                         streaming=True)
        try:
            async for event in stream_events(result, tracker, len(prompt_ids), self.meter):
                yield event
        finally:
            if not tracker.done:
                result.abort()

    def stats(self) -> dict[str, Any]:
        return {"running": self.meter.running, "waiting": 0, "tokens_per_s": self.meter.tokens_per_s(),
                "tokens_generated": self.meter.tokens_generated, "kv_block_reuse": self.capabilities.prefix_cache,
                "tensor_parallel": self.options.tensor_parallel_size}  # type: ignore[attr-defined]
