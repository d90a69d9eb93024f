"""The errors a user can cause or mend, in one place. Each front end catches `UserError`
once and shows its message: one line in a magic, an exit message in the CLI, the OpenAI
error object over HTTP. Anything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Something asked for cannot be done as asked; the message says what is accepted instead."""


class ParamError(UserError, ValueError):
    """A sampling parameter or request field is out of range; the message says what is accepted."""


class ConstraintError(ParamError):
    """A structured-output constraint that does not compile for this backend's tokenizer."""


class ModelNotFound(UserError, ValueError):
    """The model name is not an alias, a local path or (with a network) a hub id."""


class BackendError(UserError, RuntimeError):
    """A backend cannot do what was asked (missing package, no GPU, bad option...)."""


class BackendUnavailable(BackendError):
    """The backend's package or hardware is missing; the message says how to get it."""


class NoBackendError(BackendError):
    """No backend is loaded (or the named one is not)."""


class UpstreamBusy(BackendError):
    """The server a backend forwards to cannot take requests now: it is overloaded (HTTP 429 or
    503) and retries did not help, or its circuit is open. Over HTTP: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds, as the upstream's Retry-After said


class CircuitOpenError(UpstreamBusy):
    """The breaker is open: the server failed repeatedly and is not tried until the cool-down ends."""


class QueueFullError(UserError, RuntimeError):
    """The admission queue is full: too many requests in flight; retry later."""


class ServerError(UserError, RuntimeError):
    """The server cannot start (port in use, address not available...)."""


class BuildError(UserError, RuntimeError):
    """llama-cpp-python could not be built or installed for this CPU."""
