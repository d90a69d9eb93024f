"""A scripted backend for the server tests: the prompt says what happens ('slow', 'fail' mid-way,
'raise' at once), and it records what it saw cancelled. Loaded through the registry:
monkeypatch BUILTIN["fake"] = "server_fake_backend:FakeBackend"."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from jupyter_llm.backends.base import Backend, Capabilities
from jupyter_llm.schema import GenerationRequest, Message, TokenEvent


class FakeBackend(Backend):
    kind = "fake"
    capabilities = Capabilities(batching="continuous")

    def __init__(self, model: str | None = None, **options: Any):
        super().__init__(model, **options)
        self.model_name = "fake-model"
        self.running = 0
        self.cancelled: list[str] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        text = request.prompt if request.prompt is not None else request.messages[-1]["content"]
        prompt_tokens = len(self.tokenize(text))
        self.running += 1
        try:
            if "raise" in text:
                raise RuntimeError("boom inside the backend")
            for i in range(request.params.max_tokens):
                await asyncio.sleep(0.05 if "slow" in text else 0)
                if "fail" in text and i == 2:
                    # 'folded': the tokens before the failure in its event, as a lagging consumer gets them
                    folded = {"text": "t0 t1 ", "token_ids": [10, 11]} if "folded" in text else {}
                    yield TokenEvent(request.id, 0, finish_reason="error", error="the engine failed",
                                     prompt_tokens=prompt_tokens, **folded)
                    return
                if "folded" in text:
                    continue
                yield TokenEvent(request.id, 0, text=f"t{i} ", token_ids=[10 + i])
            yield TokenEvent(request.id, 0, finish_reason="length", prompt_tokens=prompt_tokens)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request.id)
            raise
        finally:
            self.running -= 1

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": 0}

    def tokenize(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def apply_chat_template(self, messages: list[Message]) -> str:
        return " ".join(m["content"] for m in messages)

    @property
    def max_model_len(self) -> int:
        return 4096

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({0})
