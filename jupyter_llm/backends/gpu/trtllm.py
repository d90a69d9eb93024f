"""The trtllm backend: TensorRT-LLM's `LLM` in this process (NVIDIA GPU), from a Hugging Face
model or a built engine directory.

`llm.generate_async(prompt, sampling_params, streaming=True)` yields cumulative
RequestOutputs (`OutputTracker` turns them into delta events); `abort()` on the result
cancels the request. TensorRT-LLM samples and matches stop strings itself: every
SamplingParams field maps to TensorRT-LLM's field of the same name, except `structured`:
`guided_decoding=GuidedDecodingParams(...)` (json, regex, grammar, json_object; a choice goes
as a regex alternation), enforced by the guided decoding backend the LLM is built with
(--guided-decoding-backend: xgrammar, llguidance on the PyTorch backend only, or none). A
TensorRT-LLM without GuidedDecodingParams does not constrain (capabilities.structured is False).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.gpu.engine import (
    GPUEngineBackend,
    GPUEngineOptions,
    build_outside_loop,
    guided_fields,
    memory_fraction,
    shared_engine_kwargs,
    shared_sampling_kwargs,
    stream_events,
)
from jupyter_llm.errors import ParamError
from jupyter_llm.model_files import ensure_hf_folder, resolve_model
from jupyter_llm.schema import GenerationRequest, SamplingParams, TokenEvent
from jupyter_llm.structured import StructuredOutput
from jupyter_llm.tokenizers import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from tensorrt_llm import LLM


@dataclass
class TRTLLMOptions(GPUEngineOptions):
    enable_block_reuse: bool = True  # KV cache reuse across requests (prefix caching)
    free_gpu_memory_fraction: float = 0.9  # of the free GPU memory, for the KV cache
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    tokenizer: str | None = None  # for an engine directory without tokenizer files
    guided_decoding_backend: str = "xgrammar"  # what enforces structured output (GUIDED_BACKENDS)


GUIDED_BACKENDS = ("xgrammar", "llguidance", "none")
_REGEX_SPECIAL = frozenset(".^$*+?()[]{}|\\")


def llm_kwargs(model: str, options: TRTLLMOptions, guided: bool = False) -> dict[str, Any]:
    """tensorrt_llm.LLM keyword arguments, except kv_cache_config (see kv_cache_kwargs); with
    the guided decoding backend when `guided` (the installed version has guided decoding)."""
    backend = options.guided_decoding_backend
    if backend not in GUIDED_BACKENDS:
        raise ParamError(f"--guided-decoding-backend must be one of {', '.join(GUIDED_BACKENDS)}, got {backend!r}")
    kwargs = shared_engine_kwargs(model, options, ("max_batch_size", "max_num_tokens", "max_seq_len", "tokenizer"))
    if guided and backend != "none":
        kwargs["guided_decoding_backend"] = backend
    return kwargs


def kv_cache_kwargs(options: TRTLLMOptions) -> dict[str, Any]:
    return {"enable_block_reuse": options.enable_block_reuse,
            "free_gpu_memory_fraction": memory_fraction(options, "free_gpu_memory_fraction")}


def guided_decoding_class() -> type | None:
    """TensorRT-LLM's GuidedDecodingParams; None in a version without guided decoding."""
    try:
        from tensorrt_llm.sampling_params import GuidedDecodingParams
    except ImportError:
        return None
    return GuidedDecodingParams


def regex_choice(options: tuple[str, ...]) -> str:
    """A regex whose matches are exactly `options` (GuidedDecodingParams has no choice)."""
    return "|".join("".join("\\" + c if c in _REGEX_SPECIAL else c for c in option) for option in options)


def sampling_kwargs(params: SamplingParams, guided: type | None = None) -> dict[str, Any]:
    """tensorrt_llm.SamplingParams keyword arguments, field by field (None leaves a filter off); a
    constraint as `guided` (GuidedDecodingParams; a backend without it refuses constrained requests)."""
    kwargs = shared_sampling_kwargs(params, top_k=params.top_k or None, min_p=params.min_p or None,
                                    stop=list(params.stop) or None)
    structured = params.structured
    if structured is not None and guided is not None:
        choice = structured.kind == "choice"
        fields = {"regex": regex_choice(structured.spec)} if choice else guided_fields(structured)  # type: ignore[arg-type]
        kwargs["guided_decoding"] = guided(**fields)
    return kwargs


def grammar_refusal(structured: StructuredOutput | None, backend: str) -> str | None:
    """Why the guided decoding backend cannot take this grammar: xgrammar reads GBNF only."""
    if structured is None or structured.kind != "grammar" or backend != "xgrammar" or "::=" in structured.spec:
        return None
    return ("xgrammar takes GBNF grammars ('rule ::= ...' lines), not Lark; load with "
            "--guided-decoding-backend llguidance for Lark grammars")


def context_length(folder: str) -> int | None:
    """The context of an HF folder (max_position_embeddings) or a built engine (build_config.max_seq_len)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("max_position_embeddings") or (data.get("build_config") or {}).get("max_seq_len")


class TRTLLMBackend(GPUEngineBackend):
    kind = "trtllm"
    options_class = TRTLLMOptions
    capabilities = Capabilities(batching="continuous", devices=("cuda",))

    def __init__(self, model: str | None = None, **options: Any):
        super().__init__(model, **options)
        self.llm: LLM | None = None
        self.guided: type | None = None  # GuidedDecodingParams, once loaded with a guided decoding backend

    def load(self, progress: bool = True) -> None:
        options: TRTLLMOptions = self.options  # type: ignore[assignment]
        spec = resolve_model(self.model_arg)
        path = ensure_hf_folder(spec, progress)
        guided = guided_decoding_class() if options.guided_decoding_backend != "none" else None
        kwargs, kv = llm_kwargs(path, options, guided is not None), kv_cache_kwargs(options)

        def build() -> LLM:
            # tensorrt_llm is imported on use: this module (options, mapping, fake-engine tests) works without it.
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
        self.guided = guided
        self.capabilities = replace(self.capabilities, prefix_cache=options.enable_block_reuse,
                                    structured=guided is not None)

    def check_request(self, request: GenerationRequest) -> None:
        super().check_request(request)
        reason = grammar_refusal(request.params.structured, self.options.guided_decoding_backend)  # type: ignore[attr-defined]
        if reason:
            raise ParamError(reason)

    async def stop(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from tensorrt_llm import SamplingParams as TRTSamplingParams  # on use, as in load()

        prompt_ids, tracker = self.open_request(request)
        sampling = TRTSamplingParams(**sampling_kwargs(request.params, self.guided))
        result = self.llm.generate_async(prompt_ids, sampling_params=sampling, streaming=True)
        try:
            async for event in stream_events(result, tracker, len(prompt_ids), self.meter):
                yield event
        finally:
            if not tracker.done:
                result.abort()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "kv_block_reuse": self.capabilities.prefix_cache,
                "tensor_parallel": self.options.tensor_parallel_size}  # type: ignore[attr-defined]
