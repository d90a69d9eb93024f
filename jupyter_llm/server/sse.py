"""Server-sent events: one event's bytes, and the response that streams them, with a write
timeout for a client that stops reading and a cleanup that runs however the stream ends."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event, encoded here: the stream yields bytes ready to send."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


class StreamResponse(EventSourceResponse):
    """An SSE response that runs `on_close(write_timed_out)` however it ends: finished, failed,
    cancelled by a disconnect or a shutdown (the stream may never have been iterated), or given
    up on because the client took no bytes for `write_timeout` seconds.

    On a shutdown signal sse-starlette would cut the stream at once; the grace period lets
    it finish, or end with the error event that the server's shutdown cancellation sends."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[bool], Awaitable[None]], grace: float,
                 write_timeout: float):
        super().__init__(content, sep="\n", shutdown_grace_period=grace, send_timeout=write_timeout)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timed_out = False
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:  # the client stopped reading: the connection is given up on
            timed_out = True
            log.warning("a streamed answer to %s waited %s s for its client to read; cancelled",
                        scope.get("client"), self.send_timeout)
        finally:
            await self.on_close(timed_out)
