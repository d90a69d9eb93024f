"""What the in-process GPU backends (vllm, trtllm) share: the options and SamplingParams
fields both engines name alike (structured output's too), building an engine outside any
running event loop, and turning an engine's cumulative per-sample outputs into TokenEvents."""
from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jupyter_llm.backends.base import Backend
from jupyter_llm.backends.meter import TokenMeter
from jupyter_llm.backends.options import BackendOptions
from jupyter_llm.backends.tokenizer_api import TokenizerServices
from jupyter_llm.errors import ParamError
from jupyter_llm.schema import GenerationRequest, SamplingParams, TokenEvent, TokenLogprob
from jupyter_llm.structured import StructuredOutput

T = TypeVar("T")


@dataclass
class GPUEngineOptions(BackendOptions):
    """The options both engines take; each backend extends this dataclass with its own."""

    tensor_parallel_size: int = 1
    dtype: str = "auto"


def shared_engine_kwargs(model: str, options: GPUEngineOptions, optional: Iterable[str]) -> dict[str, Any]:
    """The engine's keyword arguments for the shared options and those of `optional` that are
    set; options left unset keep the engine's defaults."""
    if options.tensor_parallel_size < 1:
        raise ParamError(f"--tensor-parallel-size must be >= 1, got {options.tensor_parallel_size}")
    kwargs: dict[str, Any] = {"model": model, "tensor_parallel_size": options.tensor_parallel_size,
                              "dtype": options.dtype}
    kwargs.update({name: getattr(options, name) for name in optional if getattr(options, name) is not None})
    return kwargs


def memory_fraction(options: GPUEngineOptions, name: str) -> float:
    """The option `name`, a fraction of GPU memory, checked to be in (0, 1]."""
    value = getattr(options, name)
    if not 0 < value <= 1:
        raise ParamError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
    return value


def shared_sampling_kwargs(params: SamplingParams, **engine_values: Any) -> dict[str, Any]:
    """The engine's SamplingParams keyword arguments: both engines name every field as we do;
    `engine_values` replace the few an engine spells differently (how a filter is turned off)."""
    return {"n": params.n, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k, "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty, "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty, "seed": params.seed, "stop": list(params.stop),
            "ignore_eos": params.ignore_eos, "logprobs": params.logprobs, **engine_values}


def guided_fields(structured: StructuredOutput) -> dict[str, Any]:
    """The field, with its value, of vLLM's StructuredOutputsParams (GuidedDecodingParams before
    0.10.2) that holds `structured`; TensorRT-LLM's GuidedDecodingParams names them alike, less choice."""
    if structured.kind == "json_schema":
        return {"json": structured.schema}
    if structured.kind == "json_object":
        return {"json_object": True}
    if structured.kind == "choice":
        return {"choice": list(structured.spec)}  # type: ignore[arg-type]
    return {structured.kind: structured.spec}


def build_outside_loop(build: Callable[[], T]) -> T:
    """Run `build` in a fresh thread. Engines attach background tasks to the event loop that
    is running where they are created; in a notebook cell that would be the kernel's loop,
    not the manager's. Created in a thread without a loop, they attach on first use instead."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append((True, build()))
        except BaseException as error:  # noqa: BLE001 re-raised in the caller's thread
            result.append((False, error))

    thread = threading.Thread(target=run, name="jupyter-llm-engine-build", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def top_alternatives(candidates: dict[int, Any] | None, k: int) -> list[tuple[int, str, float]]:
    """(id, text, logprob), best first, from vLLM-style {token_id: Logprob(logprob, rank, decoded_token)}."""
    if not candidates:
        return []
    ranked = sorted(candidates.items(), key=lambda item: item[1].logprob, reverse=True)[:k]
    return [(token_id, getattr(lp, "decoded_token", None) or "", lp.logprob) for token_id, lp in ranked]


@dataclass
class SampleProgress:
    """How much of one sample's cumulative output has been turned into events already."""

    ids: int = 0
    text: int = 0
    finished: bool = False


@dataclass
class OutputTracker:
    """Turns cumulative outputs (text, token_ids, logprobs, finish_reason, each growing) of the
    samples of one request into delta TokenEvents. vLLM and TensorRT-LLM both report this way."""

    request_id: str
    n: int  # samples of the request
    top: int  # logprobs asked for (0: just the chosen token's)
    want_logprobs: bool
    samples: dict[int, SampleProgress] = field(default_factory=dict)

    def events(self, outputs: list[Any], prompt_tokens: int) -> list[TokenEvent]:
        events = []
        for position, out in enumerate(outputs):
            index = getattr(out, "index", position)
            progress = self.samples.setdefault(index, SampleProgress())
            if progress.finished:
                continue
            ids = list(out.token_ids[progress.ids:])
            event = TokenEvent(self.request_id, index, text=out.text[progress.text:], token_ids=ids)
            if self.want_logprobs and ids:
                event.logprobs = self._logprobs(out, progress.ids, ids)
            progress.ids += len(ids)
            progress.text = len(out.text)
            if out.finish_reason is not None:
                progress.finished = True
                event.finish_reason = "length" if out.finish_reason == "length" else \
                    "cancelled" if out.finish_reason in ("abort", "cancelled") else "stop"
                stop = getattr(out, "stop_reason", None)
                event.stop_reason = stop if isinstance(stop, str) else None
                event.prompt_tokens = prompt_tokens
            if event.token_ids or event.text or event.finish_reason:
                events.append(event)
        return events

    def _logprobs(self, out: Any, start: int, ids: list[int]) -> list[TokenLogprob]:
        entries = list(out.logprobs or [])[start:start + len(ids)]
        result = []
        for token_id, candidates in zip(ids, entries):
            chosen = candidates.get(token_id) if isinstance(candidates, dict) else None
            if chosen is None:  # a bare float (TensorRT-LLM's simple format)
                value = float(candidates) if not isinstance(candidates, dict) else float("-inf")
                result.append(TokenLogprob(token_id, "", value, []))
                continue
            result.append(TokenLogprob(token_id, getattr(chosen, "decoded_token", None) or "", chosen.logprob,
                                       top_alternatives(candidates, self.top)))
        return result

    @property
    def done(self) -> bool:
        return sum(s.finished for s in self.samples.values()) == self.n


async def stream_events(outputs: AsyncIterator[Any], tracker: OutputTracker, prompt_tokens: int,
                        meter: TokenMeter) -> AsyncIterator[TokenEvent]:
    """Events from an engine's stream of cumulative RequestOutputs, until every sample finished."""
    meter.started()
    try:
        async for output in outputs:
            for event in tracker.events(output.outputs, prompt_tokens):
                meter.add(len(event.token_ids))
                yield event
            if tracker.done:
                return
    finally:
        meter.finished()


class GPUEngineBackend(TokenizerServices, Backend):
    """A Backend over an in-process GPU engine: the token meter, a request's prompt ids and
    output tracker, and the stats both engines report. (Its package and GPU check is
    `jupyter_llm.backends.checks.gpu_engine_availability`.)"""

    def __init__(self, model: str | None = None, **options: Any):
        super().__init__(model, **options)
        self.meter = TokenMeter()

    def open_request(self, request: GenerationRequest) -> tuple[list[int], OutputTracker]:
        """Check `request`; its prompt ids and the tracker that turns its outputs into events."""
        request = self.prepare(request)  # a prepared request is not checked again
        prompt_ids = self.prompt_ids_within_context(request)
        p = request.params
        return prompt_ids, OutputTracker(request.id, p.n, p.logprobs or 0, p.logprobs is not None)

    def stats(self) -> dict[str, Any]:
        return {"running": self.meter.running, "waiting": 0, "tokens_per_s": self.meter.tokens_per_s(),
                "tokens_generated": self.meter.tokens_generated}
