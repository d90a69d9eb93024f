"""The vllm backend: vLLM's async engine in this process (NVIDIA GPU).

`vllm.AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))` (in vLLM's V1 engine an alias
of `AsyncLLM`); `engine.generate(prompt, sampling_params, request_id)` streams cumulative
RequestOutputs, which `OutputTracker` turns into delta events; closing the stream aborts
the request in the engine. vLLM samples, detokenizes and matches stop strings itself:
every SamplingParams field maps to vLLM's field of the same name, except `structured`:
`structured_outputs=StructuredOutputsParams(...)` (vLLM >= 0.10.2), before that
`guided_decoding=GuidedDecodingParams(...)` with the same fields; a vLLM with neither does not
constrain (capabilities.structured is False). vLLM has no `strict`: its grammar backends take
the schema keywords they implement.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
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
from jupyter_llm.model_files import ensure_hf_folder, resolve_model
from jupyter_llm.schema import GenerationRequest, SamplingParams, TokenEvent
from jupyter_llm.tokenizers import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from vllm import AsyncLLMEngine


@dataclass
class VLLMOptions(GPUEngineOptions):
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # default: the model's
    enable_prefix_caching: bool | None = None  # None: vLLM's default
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    quantization: str | None = None  # awq, gptq, fp8, ...


_OPTIONAL = ("max_model_len", "enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens",
             "max_num_seqs", "quantization")


def engine_kwargs(model: str, options: VLLMOptions) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments; options left unset keep vLLM's defaults."""
    kwargs = shared_engine_kwargs(model, options, _OPTIONAL)
    kwargs["gpu_memory_utilization"] = memory_fraction(options, "gpu_memory_utilization")
    return kwargs


# (vllm.SamplingParams field, the class of its value) that carries structured output
StructuredAPI = tuple[str, type]


def structured_api() -> StructuredAPI | None:
    """How the installed vLLM takes structured output; None when it does not."""
    from vllm import sampling_params

    for field, name in (("structured_outputs", "StructuredOutputsParams"), ("guided_decoding", "GuidedDecodingParams")):
        if hasattr(sampling_params, name):
            return field, getattr(sampling_params, name)
    return None


def sampling_kwargs(params: SamplingParams, api: StructuredAPI | None = None) -> dict[str, Any]:
    """vllm.SamplingParams keyword arguments, field by field (vLLM disables top_k with -1); a
    constraint goes in `api`'s field (a backend without one refuses constrained requests)."""
    kwargs = shared_sampling_kwargs(params, top_k=params.top_k or -1)
    if params.structured is not None and api is not None:
        field, cls = api
        kwargs[field] = cls(**guided_fields(params.structured))
    return kwargs


def _config_value(engine: Any, section: str, name: str) -> Any:
    """A value of the engine's config, wherever this vLLM version keeps it (V1: engine.vllm_config,
    V0: engine.engine.<section>)."""
    for owner in (getattr(engine, "vllm_config", None), engine, getattr(engine, "engine", None)):
        value = getattr(getattr(owner, section, None), name, None)
        if value is not None:
            return value
    return None


class VLLMBackend(GPUEngineBackend):
    kind = "vllm"
    options_class = VLLMOptions
    capabilities = Capabilities(batching="continuous", devices=("cuda",))

    def __init__(self, model: str | None = None, **options: Any):
        super().__init__(model, **options)
        self.engine: AsyncLLMEngine | None = None
        self.structured_api: StructuredAPI | None = None

    def load(self, progress: bool = True) -> None:
        options: VLLMOptions = self.options  # type: ignore[assignment]
        spec = resolve_model(self.model_arg)
        path = ensure_hf_folder(spec, progress)  # a GGUF file is converted once to an HF folder
        kwargs = engine_kwargs(path, options)

        def build() -> AsyncLLMEngine:
            # vllm is imported on use: this module (options, mapping, fake-engine tests) works without it.
            from vllm import AsyncEngineArgs, AsyncLLMEngine

            return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))

        self.engine = build_outside_loop(build)
        self.tokenizer: Tokenizer = load_tokenizer(path)
        self.model_name = spec.name
        self.dtype = options.dtype
        self.device = f"cuda x{options.tensor_parallel_size}"
        self._max_model_len = int(_config_value(self.engine, "model_config", "max_model_len")
                                  or options.max_model_len or 2048)
        prefix = _config_value(self.engine, "cache_config", "enable_prefix_caching")
        self.structured_api = structured_api()
        self.capabilities = replace(self.capabilities, prefix_cache=bool(prefix),
                                    structured=self.structured_api is not None)

    async def stop(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None:
            return
        for name in ("shutdown", "shutdown_background_loop"):  # V1, V0
            if hasattr(engine, name):
                getattr(engine, name)()
                break

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from vllm import SamplingParams as VLLMSamplingParams  # on use, as in load()

        prompt_ids, tracker = self.open_request(request)
        outputs = self.engine.generate({"prompt_token_ids": prompt_ids},
                                       VLLMSamplingParams(**sampling_kwargs(request.params, self.structured_api)),
                                       request.id)
        try:
            async for event in stream_events(outputs, tracker, len(prompt_ids), self.meter):
                yield event
        finally:
            await outputs.aclose()
            if not tracker.done and self.engine is not None:
                await self.engine.abort(request.id)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "prefix_cache": self.capabilities.prefix_cache,
                "tensor_parallel": self.options.tensor_parallel_size}  # type: ignore[attr-defined]
