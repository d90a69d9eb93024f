"""What a server is allowed to do, and the command-line options that set it: defined once
for `%llm_serve` and `jupyter-llm serve`."""
from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass
from typing import Any

from jupyter_llm.argtable import ArgTable
from jupyter_llm.errors import ParamError

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    api_keys: tuple[str, ...] = ()  # none: no key needed
    rate_limit: float | None = None  # requests per second per key (or per client without keys)
    max_queue: int = 256  # samples in flight in this server (a prompt with n counts n); more get 503
    cors_origins: tuple[str, ...] = ()
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed; none by default, so a client
    # cannot pick the address its rate-limit bucket is keyed on.
    forwarded_allow_ips: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host header values accepted beyond the defaults ("*": any)
    max_body_bytes: int = 1_000_000
    max_messages: int = 2048  # messages in one chat request, as OpenAI's API
    # characters of one request's prompts or message contents: about 128k tokens of English,
    # the context of the largest common models; validation's work is bounded by it
    max_prompt_chars: int = 500_000
    max_n: int = 16  # most samples per prompt
    max_tokens: int = 4096  # most tokens per sample (the model's context bounds it further)
    # Most tokens one request may cost: its prompts' tokens plus max_tokens x n for each prompt.
    max_request_tokens: int = 65536
    # Seconds a streamed answer may wait for its client to take the next bytes; then the request
    # is cancelled, freeing its KV blocks and admission slot (a client that stops reading).
    stream_write_timeout: float = 30.0
    shutdown_timeout: float = 5.0  # seconds in-flight requests get to finish on stop, then cancelled
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ParamError(f"--port must be in [0, 65535] (0 = a free port), got {self.port}")
        if self.rate_limit is not None and not (math.isfinite(self.rate_limit) and self.rate_limit > 0):
            raise ParamError(f"--rate-limit must be a positive number of requests per second, got {self.rate_limit}")
        for name in ("max_queue", "max_body_bytes", "max_messages", "max_prompt_chars", "max_n", "max_tokens",
                     "max_request_tokens"):
            if getattr(self, name) < 1:
                raise ParamError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.stream_write_timeout) and self.stream_write_timeout > 0):
            raise ParamError(f"--stream-write-timeout must be a positive number of seconds, "
                             f"got {self.stream_write_timeout}")
        if any(not key for key in self.api_keys):
            raise ParamError("an API key must not be empty")

    @property
    def public(self) -> bool:
        """Whether the bind address is reachable from other machines."""
        if self.host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: assume it resolves to a public address
            return True

    @property
    def host_allow_list(self) -> frozenset[str] | None:
        """The Host header names answered (None: any). Bound to loopback, only loopback names, so
        that a web page cannot reach the server through DNS rebinding (as Jupyter Server does);
        bound to another address, any name unless --allowed-host lists them."""
        extra = {h.lower() for h in self.allowed_hosts}
        if "*" in extra or (self.public and not extra):
            return None
        return frozenset({"localhost", "127.0.0.1", "::1", self.host.lower()} | extra)

    @property
    def warning(self) -> str | None:
        if self.public and not self.api_keys:
            return (f"binding {self.host} without an API key: anyone who can reach this machine "
                    f"can use the model (add --api-key-env VAR)")
        return None


def parse_rate(text: str) -> float:
    """'10', '10/s', '600/min', '0.5/s' -> requests per second."""
    number, _, unit = text.strip().partition("/")
    seconds = {"": 1, "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit not in seconds or not math.isfinite(value) or value <= 0:
        raise ParamError(f"--rate-limit expects N/s or N/min with N > 0 (e.g. 5/s), got {text!r}")
    return value / seconds[unit]


SERVE = ArgTable([
    (("--host",), {"default": "127.0.0.1", "help": "address to bind (default 127.0.0.1: this machine only)"}),
    (("--port",), {"type": int, "help": f"port (default {DEFAULT_PORT}; 0 picks a free one)"}),
    (("--api-key",), {"action": "append", "metavar": "KEY", "help": "require this key (repeatable)"}),
    (("--api-key-env",), {"metavar": "VAR", "help": "require the key held in environment variable VAR"}),
    (("--rate-limit",), {"metavar": "N/s", "help": "requests per second per key (default: no limit)"}),
    (("--max-queue",), {"type": int, "default": 256,
                        "help": "samples in flight (a prompt with n counts n) before 503 (default 256)"}),
    (("--max-request-tokens",), {"type": int, "default": 65536, "metavar": "N",
                                 "help": "most tokens one request may cost: prompt + max_tokens x n, summed "
                                         "over its prompts; more get 400 (default 65536)"}),
    (("--stream-write-timeout",), {"type": float, "default": 30.0, "metavar": "SECONDS",
                                   "help": "cancel a streamed request whose client takes no bytes for this "
                                           "long (default 30)"}),
    (("--max-messages",), {"type": int, "default": 2048, "help": "messages in one chat request (default 2048)"}),
    (("--max-prompt-chars",), {"type": int, "default": 500_000,
                               "help": "characters of one request's prompts or messages (default 500000)"}),
    (("--cors",), {"action": "append", "metavar": "ORIGIN", "help": "allow browser calls from ORIGIN (repeatable)"}),
    (("--forwarded-allow-ips",), {"action": "append", "metavar": "IP",
                                  "help": "believe X-Forwarded-For from this proxy address (repeatable; "
                                          "default: none, the client address is the socket's)"}),
    (("--allowed-host",), {"action": "append", "metavar": "HOST",
                           "help": "also answer requests whose Host header names HOST (repeatable; '*' any; "
                                   "default on loopback: loopback names only)"}),
])


def settings_from_args(args: Any) -> ServerSettings:
    keys = list(args.api_key or [])
    if args.api_key_env:
        value = os.environ.get(args.api_key_env, "")
        if not value:
            raise ParamError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
        keys.append(value)
    return ServerSettings(
        host=args.host,
        port=DEFAULT_PORT if args.port is None else args.port,
        api_keys=tuple(keys),
        rate_limit=parse_rate(args.rate_limit) if args.rate_limit else None,
        max_queue=args.max_queue,
        max_request_tokens=args.max_request_tokens,
        stream_write_timeout=args.stream_write_timeout,
        max_messages=args.max_messages,
        max_prompt_chars=args.max_prompt_chars,
        cors_origins=tuple(args.cors or ()),
        forwarded_allow_ips=tuple(args.forwarded_allow_ips or ()),
        allowed_hosts=tuple(args.allowed_host or ()),
    )


def key_hint(args: Any) -> str | None:
    """How the banner names the key a client sends: the variable's name, never a key itself."""
    return f"${args.api_key_env}" if args.api_key_env else "YOUR-KEY" if args.api_key else None
