"""The vllm and trtllm backends without a GPU: option and SamplingParams mapping, the
missing-package and missing-GPU errors, capability records, and streaming, cancelling and
logprobs through fake engines that behave like vLLM's and TensorRT-LLM's (cumulative outputs)."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import re
import sys
import types
from types import SimpleNamespace

import pytest

from jupyter_llm.backends import backend_availability
from jupyter_llm.backends.gpu import engine as gpu_engine
from jupyter_llm.backends.gpu import trtllm, vllm
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.manager import EngineManager
from jupyter_llm.schema import GenerationRequest, SamplingParams
from jupyter_llm.structured import StructuredOutput

FULL = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2,
                      presence_penalty=0.3, frequency_penalty=0.4, seed=3, stop=("x", "y"), n=2, logprobs=2,
                      ignore_eos=True)
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


SAME_NAMED = SAMPLING_FIELDS - {"structured"}  # the engines name the constraint's field their own way


def test_vllm_maps_every_sampling_field_by_its_own_name():
    kwargs = vllm.sampling_kwargs(FULL)
    assert set(kwargs) == SAME_NAMED
    assert kwargs == {**{name: getattr(FULL, name) for name in SAME_NAMED}, "stop": ["x", "y"]}
    assert vllm.sampling_kwargs(SamplingParams())["top_k"] == -1  # vLLM's "off"


def test_trtllm_maps_every_sampling_field_by_its_own_name():
    kwargs = trtllm.sampling_kwargs(FULL)
    assert set(kwargs) == SAME_NAMED
    assert kwargs["top_k"] == 5 and kwargs["min_p"] == 0.1 and kwargs["stop"] == ["x", "y"]
    off = trtllm.sampling_kwargs(SamplingParams())
    assert off["top_k"] is None and off["min_p"] is None and off["stop"] is None


def test_vllm_engine_arguments_from_string_options():
    options = vllm.VLLMOptions.parse({"tensor_parallel_size": "2", "gpu_memory_utilization": "0.8",
                                      "enable_prefix_caching": True, "max_num_batched_tokens": "4096",
                                      "quantization": "awq", "dtype": "bfloat16", "max_model_len": "8192",
                                      "enable_chunked_prefill": "false"}, "vllm")
    assert vllm.engine_kwargs("/m", options) == {
        "model": "/m", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "dtype": "bfloat16",
        "max_model_len": 8192, "enable_prefix_caching": True, "enable_chunked_prefill": False,
        "max_num_batched_tokens": 4096, "quantization": "awq"}
    assert vllm.engine_kwargs("/m", vllm.VLLMOptions()) == {
        "model": "/m", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "dtype": "auto"}
    with pytest.raises(ParamError, match="gpu-memory-utilization"):
        vllm.engine_kwargs("/m", vllm.VLLMOptions(gpu_memory_utilization=1.5))
    with pytest.raises(ParamError, match="unknown option"):
        vllm.VLLMOptions.parse({"tensor_paralel_size": "2"}, "vllm")


def test_trtllm_llm_and_kv_cache_arguments():
    options = trtllm.TRTLLMOptions.parse({"tensor_parallel_size": "4", "enable_block_reuse": "false",
                                          "free_gpu_memory_fraction": "0.7", "max_batch_size": "64"}, "trtllm")
    assert trtllm.llm_kwargs("/engine", options) == {"model": "/engine", "tensor_parallel_size": 4,
                                                     "dtype": "auto", "max_batch_size": 64}
    assert trtllm.kv_cache_kwargs(options) == {"enable_block_reuse": False, "free_gpu_memory_fraction": 0.7}
    with pytest.raises(ParamError, match="free-gpu-memory-fraction"):
        trtllm.kv_cache_kwargs(trtllm.TRTLLMOptions(free_gpu_memory_fraction=0))
    with pytest.raises(ParamError, match="tensor-parallel-size must be >= 1, got 0"):
        trtllm.llm_kwargs("/engine", trtllm.TRTLLMOptions(tensor_parallel_size=0))
    with pytest.raises(ParamError, match="tensor-parallel-size must be >= 1, got 0"):
        vllm.engine_kwargs("/m", vllm.VLLMOptions(tensor_parallel_size=0))


@pytest.mark.parametrize("kind, package", [("vllm", "vllm"), ("trtllm", "tensorrt_llm")])
def test_a_missing_package_names_the_install_command(kind, package, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    ok, reason = backend_availability(kind)
    assert not ok and f"pip install 'jupyter-llm[{kind}]'" in reason
    with pytest.raises(BackendError, match=rf"cannot load here: .*jupyter-llm\[{kind}\]"):
        EngineManager().load(kind)


@pytest.mark.parametrize("kind, package", [("vllm", "vllm"), ("trtllm", "tensorrt_llm")])
def test_a_missing_gpu_is_one_line(kind, package, monkeypatch):
    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == package else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = backend_availability(kind)
    assert not ok and reason == "no NVIDIA GPU is visible (torch.cuda.is_available() is False)"

    def broken():
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    ok, reason = backend_availability(kind)
    assert not ok and "\n" not in reason and "insufficient" in reason


def test_capability_records():
    for cls in (vllm.VLLMBackend, trtllm.TRTLLMBackend):
        caps = cls.capabilities
        assert caps.batching == "continuous" and caps.devices == ("cuda",)
        assert caps.logprobs and caps.seeds and caps.penalties and caps.top_k and caps.min_p


def test_stats_keys_and_order():
    common = ["running", "waiting", "tokens_per_s", "tokens_generated"]
    assert list(vllm.VLLMBackend().stats()) == common + ["prefix_cache", "tensor_parallel"]
    assert list(trtllm.TRTLLMBackend().stats()) == common + ["kv_block_reuse", "tensor_parallel"]


# --- fake engines -------------------------------------------------------------------------

class FakeTokenizer:
    eos_token_ids = frozenset({0})

    def prompt_ids(self, request):
        return [1] * len((request.prompt or "").split())


def cumulative(pieces: list[tuple[int, str]], n: int, finish: str, logprobs: bool):
    """RequestOutputs as vLLM/TensorRT-LLM stream them: each one holds everything so far."""
    for step in range(1, len(pieces) + 1):
        done = step == len(pieces)
        outputs = []
        for index in range(n):
            ids = [token + index for token, _ in pieces[:step]]
            entries = [{i: SimpleNamespace(logprob=-0.5, decoded_token=text),
                        i + 100: SimpleNamespace(logprob=-1.5, decoded_token="alt")}
                       for i, (_, text) in zip(ids, pieces[:step])] if logprobs else None
            outputs.append(SimpleNamespace(index=index, token_ids=ids, text="".join(t for _, t in pieces[:step]),
                                           logprobs=entries, finish_reason=finish if done else None,
                                           stop_reason="x" if done and finish == "stop" else None))
        yield SimpleNamespace(outputs=outputs)


class FakeVLLMEngine:
    def __init__(self, pieces, finish="length", delay=0.0):
        self.pieces, self.finish, self.delay = pieces, finish, delay
        self.aborted: list[str] = []
        self.calls: list = []

    def generate(self, prompt, params, request_id):
        self.calls.append((prompt, params, request_id))
        outputs = list(cumulative(self.pieces, params["n"], self.finish, params["logprobs"] is not None))

        async def stream():
            for output in outputs:
                await asyncio.sleep(self.delay)
                yield output
        return stream()

    async def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", module)


def vllm_backend(engine) -> vllm.VLLMBackend:
    backend = vllm.VLLMBackend()
    backend.engine, backend.tokenizer, backend._max_model_len = engine, FakeTokenizer(), 16
    return backend


async def collect(backend, request, limit=None):
    events = []
    stream = backend.generate(request)
    async for event in stream:
        events.append(event)
        if limit and len(events) >= limit:
            break
    await stream.aclose()
    return events


PIECES = [(10, "Hel"), (11, "lo"), (12, " world")]


def test_vllm_streams_deltas_with_logprobs_and_finishes(fake_vllm):
    engine = FakeVLLMEngine(PIECES, finish="stop")
    request = GenerationRequest(prompt="a b c", params=SamplingParams(n=2, logprobs=1, seed=5, stop=("x",)))
    events = asyncio.run(collect(vllm_backend(engine), request))
    prompt, params, request_id = engine.calls[0]
    assert prompt == {"prompt_token_ids": [1, 1, 1]} and request_id == request.id
    assert params["seed"] == 5 and params["stop"] == ["x"] and params["logprobs"] == 1
    for index in (0, 1):
        mine = [e for e in events if e.index == index]
        assert "".join(e.text for e in mine) == "Hello world"
        assert [t for e in mine for t in e.token_ids] == [10 + index, 11 + index, 12 + index]
        last = mine[-1]
        assert last.finish_reason == "stop" and last.stop_reason == "x" and last.prompt_tokens == 3
        assert all(e.finish_reason is None for e in mine[:-1])
        lp = mine[0].logprobs[0]
        assert lp.token_id == 10 + index and lp.token == "Hel" and lp.top == [(10 + index, "Hel", -0.5)]
    assert engine.aborted == []


def test_vllm_closing_the_stream_aborts_the_request(fake_vllm):
    engine = FakeVLLMEngine(PIECES * 5, delay=0.01)
    backend = vllm_backend(engine)
    request = GenerationRequest(prompt="a", params=SamplingParams(max_tokens=15))
    events = asyncio.run(collect(backend, request, limit=2))
    assert len(events) == 2 and engine.aborted == [request.id]
    assert backend.stats()["running"] == 0 and backend.stats()["tokens_generated"] == 2


def test_vllm_refuses_a_prompt_beyond_the_context(fake_vllm):
    request = GenerationRequest(prompt="a " * 20)
    with pytest.raises(ParamError, match="max_model_len 16"):
        asyncio.run(collect(vllm_backend(FakeVLLMEngine(PIECES)), request))


class FakeTRTResult:
    def __init__(self, outputs, delay):
        self.outputs, self.delay, self.aborted = outputs, delay, False

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        for output in self.outputs:
            await asyncio.sleep(self.delay)
            yield output

    def abort(self):
        self.aborted = True


class FakeLLM:
    def __init__(self, delay=0.0):
        self.delay, self.results, self.calls = delay, [], []

    def generate_async(self, prompt, sampling_params, streaming):
        assert streaming
        self.calls.append((prompt, sampling_params))
        result = FakeTRTResult(list(cumulative(PIECES * 3, sampling_params["n"], "length",
                                               sampling_params["logprobs"] is not None)), self.delay)
        self.results.append(result)
        return result


@pytest.fixture
def fake_trtllm(monkeypatch):
    module = types.ModuleType("tensorrt_llm")
    module.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)


def trt_backend(llm) -> trtllm.TRTLLMBackend:
    backend = trtllm.TRTLLMBackend()
    backend.llm, backend.tokenizer, backend._max_model_len = llm, FakeTokenizer(), 16
    return backend


def test_trtllm_streams_and_finishes(fake_trtllm):
    llm = FakeLLM()
    events = asyncio.run(collect(trt_backend(llm), GenerationRequest(prompt="a b", params=SamplingParams(top_k=3))))
    prompt, params = llm.calls[0]
    assert prompt == [1, 1] and params["top_k"] == 3
    assert "".join(e.text for e in events) == "Hello world" * 3 and events[-1].finish_reason == "length"
    assert not llm.results[0].aborted


def test_trtllm_cancel_aborts(fake_trtllm):
    llm = FakeLLM(delay=0.01)
    backend = trt_backend(llm)
    events = asyncio.run(collect(backend, GenerationRequest(prompt="a"), limit=3))
    assert len(events) == 3 and llm.results[0].aborted and backend.stats()["running"] == 0


def test_output_tracker_handles_float_logprobs():
    tracker = gpu_engine.OutputTracker("r", n=1, top=0, want_logprobs=True)
    out = SimpleNamespace(index=0, token_ids=[4], text="a", logprobs=[-0.25], finish_reason="length",
                          stop_reason=None)
    [event] = tracker.events([out], prompt_tokens=2)
    assert event.logprobs[0].logprob == -0.25 and event.finish_reason == "length" and tracker.done


# --- structured output ----------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CONSTRAINTS = [StructuredOutput.json(SCHEMA), StructuredOutput.json(), StructuredOutput.regex("[0-9]{3}"),
               StructuredOutput.choice(["yes", "no"]), StructuredOutput.grammar('root ::= "a" | "b"')]


@dataclasses.dataclass
class StructuredOutputsParams:
    """vllm.sampling_params.StructuredOutputsParams's fields (vLLM >= 0.10.2), one constraint each."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self):
        constraints = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
        if sum(getattr(self, name) is not None for name in constraints) != 1:
            raise ValueError("exactly one kind of structured outputs constraint")


@dataclasses.dataclass
class OldGuidedDecodingParams:
    """vllm.sampling_params.GuidedDecodingParams's fields (vLLM 0.6.3 to 0.10.1)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None


@dataclasses.dataclass(kw_only=True)
class TRTGuidedDecodingParams:
    """tensorrt_llm.sampling_params.GuidedDecodingParams's fields (1.x); no choice."""

    json: str | dict | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None


def expected_fields(structured: StructuredOutput) -> dict:
    """The one field each engine's params class holds a constraint in (vLLM's names)."""
    if structured.kind == "json_schema":
        return {"json": SCHEMA}
    if structured.kind == "json_object":
        return {"json_object": True}
    return {structured.kind: list(structured.spec) if structured.kind == "choice" else structured.spec}


def vllm_sampling_module(monkeypatch, *classes):
    """vllm.sampling_params holding `classes` (under vLLM's names for them)."""
    module = types.ModuleType("vllm.sampling_params")
    for cls in classes:
        setattr(module, "StructuredOutputsParams" if cls is StructuredOutputsParams else "GuidedDecodingParams", cls)
    sys.modules["vllm"].sampling_params = module
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module)


@pytest.mark.parametrize("cls, field", [(StructuredOutputsParams, "structured_outputs"),
                                        (OldGuidedDecodingParams, "guided_decoding")])
@pytest.mark.parametrize("structured", CONSTRAINTS, ids=lambda s: s.kind)
def test_vllm_maps_each_constraint_to_its_field(fake_vllm, monkeypatch, cls, field, structured):
    vllm_sampling_module(monkeypatch, cls)
    api = vllm.structured_api()
    assert api == (field, cls)
    kwargs = vllm.sampling_kwargs(SamplingParams(structured=structured), api)
    assert kwargs[field] == cls(**expected_fields(structured))
    assert field not in vllm.sampling_kwargs(SamplingParams(), api)


def test_vllm_prefers_structured_outputs_and_knows_when_it_has_neither(fake_vllm, monkeypatch):
    vllm_sampling_module(monkeypatch, StructuredOutputsParams, OldGuidedDecodingParams)
    assert vllm.structured_api() == ("structured_outputs", StructuredOutputsParams)  # 0.10.2 kept both for a while
    vllm_sampling_module(monkeypatch)
    assert vllm.structured_api() is None


def fake_vllm_load(monkeypatch, engine) -> vllm.VLLMBackend:
    """VLLMBackend.load on the fake vllm module: no model files, the engine given."""
    sys.modules["vllm"].AsyncEngineArgs = lambda **kwargs: kwargs
    sys.modules["vllm"].AsyncLLMEngine = SimpleNamespace(from_engine_args=lambda args: engine)
    monkeypatch.setattr(vllm, "resolve_model", lambda name: SimpleNamespace(name="m"))
    monkeypatch.setattr(vllm, "ensure_hf_folder", lambda spec, progress: "/m")
    monkeypatch.setattr(vllm, "load_tokenizer", lambda path: FakeTokenizer())
    backend = vllm.VLLMBackend()
    backend.load(progress=False)
    backend._max_model_len = 16
    return backend


def test_vllm_sends_a_constraint_where_its_version_takes_one(fake_vllm, monkeypatch):
    engine = FakeVLLMEngine(PIECES, finish="stop")
    vllm_sampling_module(monkeypatch, StructuredOutputsParams)
    backend = fake_vllm_load(monkeypatch, engine)
    assert backend.capabilities.structured
    choice = StructuredOutput.choice(["Paris", "Rome"])
    asyncio.run(collect(backend, GenerationRequest(prompt="a", params=SamplingParams(structured=choice))))
    assert engine.calls[0][1]["structured_outputs"] == StructuredOutputsParams(choice=["Paris", "Rome"])
    vllm_sampling_module(monkeypatch)  # a vLLM older than guided decoding
    old = fake_vllm_load(monkeypatch, engine)
    assert not old.capabilities.structured
    with pytest.raises(ParamError, match="does not support structured output"):
        asyncio.run(collect(old, GenerationRequest(prompt="a", params=SamplingParams(structured=choice))))
    asyncio.run(collect(old, GenerationRequest(prompt="a")))  # unconstrained requests still run


@pytest.mark.parametrize("structured", CONSTRAINTS, ids=lambda s: s.kind)
def test_trtllm_maps_each_constraint_and_a_choice_as_a_regex(structured):
    guided = trtllm.sampling_kwargs(SamplingParams(structured=structured), TRTGuidedDecodingParams)["guided_decoding"]
    if structured.kind == "choice":
        assert guided == TRTGuidedDecodingParams(regex=trtllm.regex_choice(structured.spec))
    else:
        assert guided == TRTGuidedDecodingParams(**expected_fields(structured))
    assert "guided_decoding" not in trtllm.sampling_kwargs(SamplingParams(), TRTGuidedDecodingParams)


def test_a_choice_regex_matches_exactly_its_options():
    options = ("a.b", "(x)|y", "1+1=2?", "back\\slash", "[z]{2}^$*", "plain")
    pattern = trtllm.regex_choice(options)
    assert all(re.fullmatch(pattern, option) for option in options)
    for other in ("axb", "x", "y", "11=2", "zz", "plai", "plainplain", "a.bplain"):
        assert not re.fullmatch(pattern, other), other


def fake_trtllm_load(monkeypatch, guided, **options) -> tuple[trtllm.TRTLLMBackend, dict]:
    """TRTLLMBackend.load on a fake tensorrt_llm whose GuidedDecodingParams is `guided` (None: a
    version without); the backend and the keyword arguments its LLM was built with."""
    built = {}

    def build_llm(**kwargs):
        built.update(kwargs)
        return FakeLLM()

    package = types.ModuleType("tensorrt_llm")
    package.SamplingParams = lambda **kwargs: kwargs
    package.LLM = build_llm
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = lambda **kwargs: kwargs
    sampling = types.ModuleType("tensorrt_llm.sampling_params")
    if guided is not None:
        sampling.GuidedDecodingParams = guided
    package.llmapi, package.sampling_params = llmapi, sampling
    for name, module in (("tensorrt_llm", package), ("tensorrt_llm.llmapi", llmapi),
                         ("tensorrt_llm.sampling_params", sampling)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(trtllm, "resolve_model", lambda name: SimpleNamespace(name="m"))
    monkeypatch.setattr(trtllm, "ensure_hf_folder", lambda spec, progress: "/m")
    monkeypatch.setattr(trtllm, "load_tokenizer", lambda path: FakeTokenizer())
    backend = trtllm.TRTLLMBackend(**options)
    backend.load(progress=False)
    backend._max_model_len = 16
    return backend, built


def test_trtllm_builds_its_llm_with_a_guided_decoding_backend(monkeypatch):
    backend, built = fake_trtllm_load(monkeypatch, TRTGuidedDecodingParams)
    assert built["guided_decoding_backend"] == "xgrammar" and backend.capabilities.structured
    regex = StructuredOutput.regex("[a-z]+")
    asyncio.run(collect(backend, GenerationRequest(prompt="a", params=SamplingParams(structured=regex)), limit=1))
    assert backend.llm.calls[0][1]["guided_decoding"] == TRTGuidedDecodingParams(regex="[a-z]+")
    _, built = fake_trtllm_load(monkeypatch, TRTGuidedDecodingParams, guided_decoding_backend="llguidance")
    assert built["guided_decoding_backend"] == "llguidance"
    for guided, options in ((None, {}), (TRTGuidedDecodingParams, {"guided_decoding_backend": "none"})):
        unguided, built = fake_trtllm_load(monkeypatch, guided, **options)
        assert "guided_decoding_backend" not in built and built["model"] == "/m"
        assert not unguided.capabilities.structured
        with pytest.raises(ParamError, match="does not support structured output"):
            unguided.check_request(GenerationRequest(prompt="a", params=SamplingParams(structured=regex)))
    with pytest.raises(ParamError, match="guided-decoding-backend must be one of xgrammar, llguidance, none"):
        trtllm.llm_kwargs("/m", trtllm.TRTLLMOptions(guided_decoding_backend="outlines"), guided=True)


def test_trtllm_xgrammar_refuses_a_lark_grammar(monkeypatch):
    lark = GenerationRequest(prompt="a", params=SamplingParams(structured=StructuredOutput.grammar('start: "a"')))
    gbnf = GenerationRequest(prompt="a", params=SamplingParams(structured=StructuredOutput.grammar('root ::= "a"')))
    xgrammar, _ = fake_trtllm_load(monkeypatch, TRTGuidedDecodingParams)
    with pytest.raises(ParamError, match="xgrammar takes GBNF grammars"):
        xgrammar.check_request(lark)
    xgrammar.check_request(gbnf)
    llguidance, _ = fake_trtllm_load(monkeypatch, TRTGuidedDecodingParams, guided_decoding_backend="llguidance")
    llguidance.check_request(lark)
