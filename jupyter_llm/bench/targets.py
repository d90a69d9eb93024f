"""What a benchmark measures: a loaded backend (through the manager) or an OpenAI-compatible
URL (streaming over HTTP). Both time tokens where they arrive."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from jupyter_llm.bench.workload import BenchRequest
from jupyter_llm.manager import EngineManager
from jupyter_llm.schema import GenerationRequest, SamplingParams


@dataclass
class RequestRecord:
    """One request's timeline: seconds since its start for each token arrival."""

    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def e2el(self) -> float:
        return self.end


SPEC_COUNTERS = ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")


class Target(Protocol):
    label: str

    async def send(self, request: BenchRequest) -> RequestRecord: ...

    def speculation_counters(self) -> dict[str, int] | None:
        """The engine's speculative-decoding counters now (None when it does not speculate or
        cannot say); the runner turns their change over a run into acceptance figures."""

    async def close(self) -> None: ...


class BackendTarget:
    """A backend loaded in the manager, by name."""

    def __init__(self, manager: EngineManager, name: str):
        self.manager = manager
        self.name = manager.resolve_name(name)
        self.label = self.name

    async def send(self, request: BenchRequest) -> RequestRecord:
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0, ignore_eos=request.ignore_eos)
        generation = GenerationRequest(prompt=request.prompt, messages=request.messages, params=params)
        record = RequestRecord()
        started = time.monotonic()
        try:
            async for event in self.manager.astream([generation], backend=self.name):
                if event.token_ids:
                    record.token_times.extend([event.timestamp - started] * len(event.token_ids))
                    record.output_tokens += len(event.token_ids)
                if event.finish_reason is not None:
                    record.prompt_tokens = event.prompt_tokens or 0
                    if event.finish_reason == "error":
                        record.error = event.error or "error"
        except Exception as error:  # noqa: BLE001 a failing target is a row of errors, not a crash
            record.error = f"{type(error).__name__}: {error}"
        record.end = time.monotonic() - started
        return record

    def speculation_counters(self) -> dict[str, int] | None:
        extra = self.manager.info(self.name).extra
        return {k: extra[k] for k in SPEC_COUNTERS} if all(k in extra for k in SPEC_COUNTERS) else None

    async def close(self) -> None:
        return None


class HTTPTarget:
    """An OpenAI-compatible server: /v1/completions or /v1/chat/completions with stream=True."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600,
                 label: str | None = None):
        import httpx

        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.label = label or url
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def _model(self) -> str:
        if self.model is None:
            response = await self.client.get(f"{self.base}/models")
            response.raise_for_status()
            self.model = response.json()["data"][0]["id"]
        return self.model

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord()
        started = time.monotonic()
        try:
            body: dict[str, Any] = {"model": await self._model(), "max_tokens": request.max_tokens,
                                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            if request.ignore_eos:
                body["ignore_eos"] = True
            if request.messages is not None:
                body["messages"], path = request.messages, "chat/completions"
            else:
                body["prompt"], path = request.prompt, "completions"
            async with self.client.stream("POST", f"{self.base}/{path}", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:200]
                    raise RuntimeError(f"HTTP {response.status_code}: {text}")
                async for line in response.aiter_lines():
                    self._on_line(line, record, time.monotonic() - started)
            record.output_tokens = record.output_tokens or len(record.token_times)
        except Exception as error:  # noqa: BLE001 (a failed request is a result: recorded, not raised)
            record.error = f"{type(error).__name__}: {error}"
        record.end = time.monotonic() - started
        return record

    @staticmethod
    def _on_line(line: str, record: RequestRecord, now: float) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"].get("message", "server error"))
        for choice in chunk.get("choices") or []:
            piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if piece:  # a chunk with text is a token arrival (servers send one token per chunk)
                record.token_times.append(now)
        usage = chunk.get("usage")
        if usage:
            record.prompt_tokens = usage.get("prompt_tokens", 0)
            record.output_tokens = usage.get("completion_tokens", 0)

    def speculation_counters(self) -> dict[str, int] | None:
        return None  # a remote server's engine counters are not read (its /metrics has them)

    async def close(self) -> None:
        await self.client.aclose()
