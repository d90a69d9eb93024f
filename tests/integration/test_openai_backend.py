"""The openai backend against real servers on loopback: llama-cpp-python's
(`python -m llama_cpp.server`) and this project's own, streaming and not, completions and
chat, logprobs, stop strings, and the errors a user sees."""
from __future__ import annotations

import asyncio

import pytest

from backends_external import free_port, llamacpp_server
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.schema import SamplingParams

pytestmark = pytest.mark.embedded
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def llamacpp_url(embedded_model):
    with llamacpp_server(str(embedded_model)) as url:
        yield url


@pytest.fixture(scope="module")
def remote(manager, llamacpp_url):
    manager.load("openai", name="it-openai-llamacpp", progress=False, url=llamacpp_url, max_model_len=2048)
    yield "it-openai-llamacpp"
    manager.unload("it-openai-llamacpp")


@pytest.fixture(scope="module")
def own(manager, embedded_model):
    """Our server, serving the embedded model on llamacpp, and the openai backend pointed at it."""
    from jupyter_llm.server.launcher import start_server
    from jupyter_llm.server.settings import ServerSettings

    pytest.importorskip("llama_cpp")
    manager.load("llamacpp", name="it-served", progress=False, n_ctx=2048)
    handle = start_server(manager, ServerSettings(port=0, api_keys=("secret",)))
    manager.load("openai", "it-served", name="it-openai-own", progress=False, url=handle.url, api_key="secret")
    yield "it-openai-own"
    manager.unload("it-openai-own")
    handle.stop()
    manager.unload("it-served")


def test_the_server_is_described(manager, remote, embedded_model):
    backend = manager.get(remote)
    assert backend.model_name == str(embedded_model) and backend.dialect == "llamacpp"
    assert backend.tokenizer is not None  # the served .gguf is a local file: its vocabulary is read here
    stats = manager.info(remote).extra
    assert stats["circuit"] == "closed" and stats["url"].endswith("/v1")


@pytest.mark.parametrize("target", ["remote", "own"])
def test_completion_streaming_and_not(manager, target, request):
    name = request.getfixturevalue(target)
    [whole] = manager.generate("The capital of France is", GREEDY, backend=name)
    assert "Paris" in whole.text and whole.finish_reason == "length" and whole.completion_tokens == 8
    events = list(manager.stream("The capital of France is", GREEDY, backend=name))
    pieces = [e for e in events if e.text]
    assert len(pieces) >= 6 and "".join(e.text for e in events) == whole.text  # token by token, same text


@pytest.mark.parametrize("target", ["remote", "own"])
def test_chat_stop_and_logprobs(manager, target, request):
    name = request.getfixturevalue(target)
    [chat] = manager.generate("What is 2 + 2?", GREEDY.replace(max_tokens=12), backend=name, chat=True)
    assert chat.text.strip() and chat.prompt_tokens > 10
    [cut] = manager.generate("The capital of France is", GREEDY.replace(max_tokens=16, stop=(".",)), backend=name)
    assert cut.text == " Paris" and cut.stop_reason == "."
    [scored] = manager.generate("The capital of France is", GREEDY.replace(max_tokens=2, logprobs=3), backend=name)
    assert scored.logprobs[0].token == " Paris" and next(t[1] for t in scored.logprobs[0].top) == " Paris"


def test_async_callers_get_the_same_answers(manager, remote):
    async def run():
        return await asyncio.gather(*(manager.agenerate(p, GREEDY, backend=remote) for p in ("Hello", "Paris is")))

    first, second = asyncio.run(run())
    assert first[0].text and second[0].text and first[0].text != second[0].text


def test_a_model_the_server_does_not_serve(manager, llamacpp_url):
    with pytest.raises(BackendError, match="does not serve 'nope'; it serves"):
        manager.load("openai", "nope", name="it-bad", progress=False, url=llamacpp_url)


def test_an_unreachable_server_fails_at_load(manager):
    with pytest.raises(BackendError, match="cannot reach http://127.0.0.1:.*is the server running"):
        manager.load("openai", name="it-down", progress=False, url=f"http://127.0.0.1:{free_port()}")


def test_a_wrong_api_key_is_a_clear_error(manager, own):
    url = manager.get(own).url
    with pytest.raises(BackendError, match="refused the API key"):
        manager.load("openai", name="it-nokey", progress=False, url=url, api_key="wrong")


def test_a_refused_parameter_is_a_clear_error(manager, own):
    # A seed outside int64 is a Python int here; the server refuses it with a 400.
    with pytest.raises(ParamError, match="refused the request"):
        manager.generate("Hello", SamplingParams(max_tokens=2, temperature=0, top_p=1.0, seed=-(2**64)),
                         backend=own)
