"""Running the app with uvicorn: in a background thread of the kernel (`start_server`, for
`%llm_serve`), or in the foreground until SIGINT/SIGTERM (`serve_forever`, for
`jupyter-llm serve`).

The socket is bound here before uvicorn starts, so that a port in use is a clear error
at once and port 0 gets its real number. Stopping lets in-flight requests finish for
`settings.shutdown_timeout` seconds, then cancels them (inside the backend too).
"""
from __future__ import annotations

import asyncio
import errno
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from jupyter_llm.errors import ServerError
from jupyter_llm.server.settings import ServerSettings

_servers: dict[int, ServerHandle] = {}  # port -> the servers started in this process
_lock = threading.Lock()


def bind(settings: ServerSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on connections whose socket says
    # so, and without it Nagle's algorithm holds back each response's body on keep-alive.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Lets a restarted server take its port back at once (old connections in TIME_WAIT);
    # a port another socket listens on still fails.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as error:
        sock.close()
        reason = "it is already in use" if error.errno == errno.EADDRINUSE else error.strerror or str(error)
        raise ServerError(f"cannot listen on {settings.host}:{settings.port}: {reason}; "
                          f"pick another --port (0 picks a free one)") from None
    return sock


def _uvicorn(app: Any, settings: ServerSettings, in_kernel: bool) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # In-flight requests get `shutdown_timeout` seconds; then they are cancelled in the
            # backend, so that each client still gets an answer (503, or an SSE error event)
            # before uvicorn's own deadline cancels the handlers themselves.
            timer = asyncio.get_running_loop().call_later(settings.shutdown_timeout,
                                                          app.state.generation.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    # In a kernel, uvicorn must not reconfigure the process's logging (its records would
    # land in whatever cell runs); warnings and errors still reach stderr.
    extra = {"log_config": None} if in_kernel else {}
    # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: only from the proxies named here.
    proxies = {"proxy_headers": True, "forwarded_allow_ips": list(settings.forwarded_allow_ips)} \
        if settings.forwarded_allow_ips else {"proxy_headers": False}
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=round(settings.shutdown_timeout) + 5, **proxies, **extra)
    return Server(config)


def url_of(settings: ServerSettings, port: int) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # every address: this machine reaches it on loopback
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerHandle:
    """A server running in a background thread of this process."""

    def __init__(self, app: Any, server: Any, thread: threading.Thread, settings: ServerSettings, port: int):
        self.app, self.server, self.thread, self.settings, self.port = app, server, thread, settings, port
        self.url = url_of(settings, port)
        self.started = time.monotonic()

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    @property
    def requests_served(self) -> int:
        return self.app.state.metrics.requests_served

    @property
    def errors(self) -> int:
        return self.app.state.metrics.errors

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {"url": self.url + "/v1", "uptime": format_duration(self.uptime),
                "requests served": self.requests_served, "errors": self.errors,
                "in flight": len(self.app.state.generation.inflight), "state": "running" if self.running else "stopped"}

    def stop(self) -> None:
        """Finish (or, past the shutdown timeout, cancel) in-flight requests and free the port."""
        self.server.should_exit = True
        self.thread.join(self.settings.shutdown_timeout + 10)
        with _lock:
            if _servers.get(self.port) is self:
                del _servers[self.port]

    def __repr__(self) -> str:
        return f"<ServerHandle {self.url} {'running' if self.running else 'stopped'}>"


def start_server(manager: Any, settings: ServerSettings, timeout: float = 30.0) -> ServerHandle:
    """Serve `manager`'s backends from a background thread; returns once the port accepts
    connections."""
    from jupyter_llm.server.app import create_app

    with _lock:
        existing = _servers.pop(settings.port, None)
        if existing is not None and existing.running:
            _servers[settings.port] = existing
            raise ServerError(f"a server already runs on port {settings.port} ({existing.url}); "
                              f"stop it first (%llm_serve --stop) or pick another --port")
        sock = bind(settings)
        port = sock.getsockname()[1]
        app = create_app(manager, settings)
        server = _uvicorn(app, settings, in_kernel=True)
        failures: list[BaseException] = []

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as error:  # noqa: BLE001 reported by start_server
                failures.append(error)
            finally:
                sock.close()

        thread = threading.Thread(target=run, name=f"jupyter-llm-server-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            server.should_exit = True
            thread.join(5)
            raise ServerError(f"the server did not start: {failures[0] if failures else 'timed out'}")
        handle = ServerHandle(app, server, thread, settings, port)
        _servers[port] = handle
        return handle


def running_servers() -> list[ServerHandle]:
    with _lock:
        return [h for h in _servers.values() if h.running]


def stop_servers(port: int | None = None) -> list[ServerHandle]:
    """Stop the servers of this process (or the one on `port`); returns those stopped."""
    with _lock:
        targets = [h for p, h in _servers.items() if port in (None, p)]
    for handle in targets:
        handle.stop()
    return targets


def serve_forever(manager: Any, settings: ServerSettings, on_ready: Callable[[str], None]) -> None:
    """Serve in the foreground until SIGINT or SIGTERM, then shut down gracefully.
    `on_ready(url)` runs once the socket is bound."""
    from jupyter_llm.server.app import create_app

    sock = bind(settings)
    server = _uvicorn(create_app(manager, settings), settings, in_kernel=False)
    on_ready(url_of(settings, sock.getsockname()[1]))
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal to
    # the previous handler: let SIGTERM end up like SIGINT, as a normal return.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def banner(url: str, models: list[str], default: str | None, key_hint: str | None, stop_hint: str) -> str:
    """What a user needs to call the server: URL, models, and ready-to-paste snippets."""
    model = default or (models[0] if models else "MODEL")
    listed = ", ".join(f"{m} (default)" if m == default else m for m in models) or \
        "none yet: load one with %llm_backend (/health answers 503 until then)"
    auth = f' -H "Authorization: Bearer {key_hint}"' if key_hint else ""
    api_key = f'os.environ["{key_hint[1:]}"]' if key_hint and key_hint.startswith("$") else \
        repr("YOUR-KEY") if key_hint else '"none"'
    imports = "import os\n" if api_key.startswith("os.") else ""
    return (f"OpenAI-compatible server at {url}/v1 (also /health and /metrics)\n"
            f"models: {listed}\n\n"
            f"curl {url}/v1/chat/completions -H \"Content-Type: application/json\"{auth} \\\n"
            f"  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
            f"{imports}from openai import OpenAI\n"
            f"client = OpenAI(base_url=\"{url}/v1\", api_key={api_key})\n"
            f"reply = client.chat.completions.create(model=\"{model}\", "
            f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
            f"print(reply.choices[0].message.content)\n\n"
            f"{stop_hint}")
