"""The size of a request: at most --max-messages messages and --max-prompt-chars characters,
and validation (chat templates, tokenizing) off the event loop when a request is large."""
import asyncio

import httpx
import pytest

from jupyter_llm.cli import parse
from jupyter_llm.errors import ParamError
from jupyter_llm.server.settings import ServerSettings, settings_from_args
from manager_helpers import manager_with
from server_fake_backend import FakeBackend
from server_helpers import assert_openai_error, running_server


class ThreadRecordingBackend(FakeBackend):
    """Records, for each prompt it tokenizes, whether that ran on an event loop's thread."""

    kind = "recording"

    def __init__(self, model: str | None = None, **options):
        super().__init__(model, **options)
        self.on_loop: list[bool] = []

    def prompt_ids(self, request):
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return super().prompt_ids(request)


@pytest.fixture
def recording(monkeypatch):
    with manager_with(monkeypatch, "recording", "test_server_limits:ThreadRecordingBackend") as fresh:
        yield fresh


def chat(url: str, messages: list[dict], **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **body}, timeout=30)


def test_defaults_and_flags():
    assert (ServerSettings().max_messages, ServerSettings().max_prompt_chars) == (2048, 500_000)
    args = parse(["serve", "--max-messages", "10", "--max-prompt-chars", "99"])
    settings = settings_from_args(args)
    assert (settings.max_messages, settings.max_prompt_chars) == (10, 99)
    with pytest.raises(ParamError, match="max_messages must be >= 1"):
        ServerSettings(max_messages=0)


def test_too_many_messages_are_refused_before_any_work(recording):
    with running_server(recording, max_messages=4) as server:
        answer = chat(server.url, [{"role": "user", "content": ""}] * 5)
        assert_openai_error(answer, 400, param="messages")
        assert "at most 4" in answer.json()["error"]["message"]
        assert chat(server.url, [{"role": "user", "content": "hi"}] * 4).status_code == 200
    assert len(recording.get("recording").on_loop) == 1  # only the accepted request was tokenized


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": ["a" * 6, "b" * 5]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 6},
                                           {"role": "user", "content": [{"type": "text", "text": "b" * 5}]}]},
     "messages"),
])
def test_too_many_characters_are_refused(recording, path, body, param):
    with running_server(recording, max_prompt_chars=10) as server:
        answer = httpx.post(server.url + path, json={"max_tokens": 2, **body}, timeout=30)
        error = assert_openai_error(answer, 400, param=param, code="string_above_max_length")
        assert "11 characters" in error["message"] and "at most 10" in error["message"]
    assert recording.get("recording").on_loop == []


def test_many_small_messages_are_validated_off_the_event_loop(recording):
    """2,000 empty messages are 0 characters, but their chat template is real work."""
    with running_server(recording) as server:
        assert chat(server.url, [{"role": "user", "content": "hi"}]).status_code == 200
        assert chat(server.url, [{"role": "user", "content": ""}] * 1999 + [{"role": "user", "content": "hi"}]
                    ).status_code == 200
    assert recording.get("recording").on_loop == [True, False]  # a short chat inline, the long one in a thread
