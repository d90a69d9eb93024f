"""How a failure inside the manager or a backend becomes the OpenAI error a client reads:
what failed, in words; the exception's own text goes to the server's log."""
from __future__ import annotations

import logging

from jupyter_llm.backends.base import Backend
from jupyter_llm.errors import BackendError, ParamError, QueueFullError
from jupyter_llm.schema import Completion
from jupyter_llm.server.protocol import APIError, user_error

log = logging.getLogger(__name__)


def backend_failure(error: BaseException) -> APIError:
    """An exception from the manager or a backend as the answer's status."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, (ParamError, QueueFullError, BackendError)):
        return user_error(error)
    log.error("generation failed", exc_info=error)
    return APIError(500, "The server had an error while processing your request", type="server_error")


def sample_failure(c: Completion, backend: Backend) -> APIError:
    """The error for a sample that ended as 'error' or 'cancelled'."""
    if c.finish_reason == "error":
        said = f": {c.error}" if backend.errors_fit_for_clients else " (the server's log says why)"
        return APIError(500, f"the backend failed while generating this answer{said}", type="server_error",
                        code="backend_error")
    return APIError(503, "the request was cancelled on the server (shutdown or cancel)", type="server_error",
                    code="request_cancelled")
