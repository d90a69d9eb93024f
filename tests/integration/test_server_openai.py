"""The official `openai` client against the server as users start it: `%llm_serve` in a real
kernel and `jupyter-llm serve` in a subprocess, both over the tiny random model."""
from __future__ import annotations

import threading

import openai
import pytest

from server_processes import cli_server, kernel_server

pytestmark = pytest.mark.slow

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module", params=["kernel", "cli"])
def served(request, tiny_llama):
    """(base URL, the kernel or None) of a running server, one of each kind per module."""
    if request.param == "kernel":
        with kernel_server(tiny_llama, MODEL) as (url, kernel):
            yield url, kernel
    else:
        with cli_server(["--backend", "hf", "--model", str(tiny_llama), "--name", MODEL, "--port", "0"]) as server:
            yield server.url, None
        assert server.process.returncode == 0, "".join(server.stderr)[-2000:]


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def complete(client, **kwargs):
    kwargs.setdefault("extra_body", {"ignore_eos": True})
    return client.completions.create(model=MODEL, **kwargs)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "jupyter-llm"
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion(client):
    out = complete(client, prompt="Once upon a time", max_tokens=8, seed=1)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].finish_reason == "length" and isinstance(out.choices[0].text, str)
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_chat_completion(client):
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=6,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 6


def test_streaming_with_usage_matches_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, seed=3,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, seed=3, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = list(complete(client, prompt="Hello", max_tokens=5, seed=2, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == complete(client, prompt="Hello", max_tokens=5,
                                                                     seed=2).choices[0].text


def test_n_samples(client):
    out = complete(client, prompt="Hello", max_tokens=6, n=3, seed=9)
    assert sorted(c.index for c in out.choices) == [0, 1, 2] and out.usage.completion_tokens == 18
    assert len({c.text for c in out.choices}) > 1
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, n=2)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop(client):
    text = complete(client, prompt="Hello", max_tokens=20, seed=11).choices[0].text
    stop = text[4:6]
    out = complete(client, prompt="Hello", max_tokens=20, seed=11, stop=[stop, "never-seen"])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == text[:text.index(stop)]


def test_seed_reproducibility(client):
    texts = [complete(client, prompt="Hello", max_tokens=12, seed=s, temperature=1.0).choices[0].text
             for s in (21, 21, 22)]
    assert texts[0] == texts[1] != texts[2]
    chats = [client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, seed=5,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
             for _ in range(2)]
    assert chats[0] == chats[1]


def test_logprobs(client):
    out = complete(client, prompt="Hello", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_errors_come_back_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as bad:
        complete(client, prompt="Hello", temperature=-1)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="Hello")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        complete(client, prompt="Hello", max_tokens=1000)
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_the_kernel_stays_usable_while_serving(served, client):
    url, kernel = served
    if kernel is None:
        pytest.skip("only the kernel's server shares its process with cells")
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        out=complete(client, prompt="Hello", max_tokens=300, seed=1)))
    worker.start()
    cell = kernel.run("%%generate --max-tokens 5 --ignore-eos --no-stream -o answers\nOnce upon a time")
    assert not cell.errors and "5 tokens" in cell.text
    assert kernel.run("print(1 + 1)").text.strip() == "2"
    worker.join(120)
    assert results["out"].usage.completion_tokens == 300
    status = kernel.run("%llm_serve --status")
    assert url in status.text and "requests served" in status.text
