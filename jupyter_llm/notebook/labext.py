"""The kernel side of the JupyterLab extension (labextension/): one Jupyter comm target.

Protocol (comm target ``jupyter_llm``, JSON messages):

- On ``%load_ext jupyter_llm`` the kernel opens a comm to the frontend with the current
  status. A frontend without our labextension ignores it (or closes it) and costs nothing:
  nothing is pushed to a comm until the frontend has sent a message on it.
- The frontend may also open a comm itself (after a page reload it asks ``comm_info`` for
  ``jupyter_llm`` comms and opens a new one when the kernel has loaded us).
- frontend -> kernel ``{"action": "status"}``: reply ``{"type": "status", ...}`` and
  subscribe that comm to pushed updates.
- ``{"action": "table"}``: reply ``{"type": "table", "rows": [...]}`` (the ``%llm_backend`` table).
- ``{"action": "stop"}``: ``manager.cancel()`` every in-flight request; reply
  ``{"type": "stopped", "cancelled": n}``.
- kernel -> frontend ``{"type": "status", "loaded": true, "default", "backend", "model",
  "running", "waiting", "tokens_per_s", "server_url", "backends"}``: pushed by a daemon thread at
  most every ``INTERVAL`` seconds, only while a subscribed comm is open and only when the
  status changed.

Threads: with ipykernel 7 and JupyterLab 4.4+ the frontend sends comm messages to a kernel
subshell, so the handlers run on a subshell thread while a cell blocks the main shell;
"stop" reaches the manager at once. Every handler here is thread-safe (one lock; the
manager's ``cancel`` is thread-safe). No torch import, no manager creation just to report.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from jupyter_llm.views import backend_rows

TARGET = "jupyter_llm"
INTERVAL = 0.5  # seconds between status polls: at most 2 updates/s


def _existing_manager() -> Any:
    """The kernel's manager if one exists (never creates one)."""
    module = sys.modules.get("jupyter_llm.manager")
    return getattr(module, "_manager", None) if module is not None else None


def _server_url() -> str | None:
    """The URL of a `%llm_serve` server running in this kernel (None when none runs)."""
    runner = sys.modules.get("jupyter_llm.server.launcher")  # not imported: no server was started
    if runner is None:
        return None
    try:
        servers = runner.running_servers()
    except Exception:  # noqa: BLE001 (the status bar shows no server rather than fail)
        return None
    return servers[0].url + "/v1" if servers else None


def status(manager: Any = None, server_url: Callable[[], str | None] = _server_url) -> dict[str, Any]:
    """A small JSON-able summary for the status bar."""
    manager = _existing_manager() if manager is None else manager
    snapshot: dict[str, Any] = {"type": "status", "loaded": True, "default": None, "backend": None, "model": None,
                                "running": 0, "waiting": 0, "tokens_per_s": 0.0, "backends": 0,
                                "server_url": server_url()}
    if manager is None:
        return snapshot
    try:
        infos = manager.backends()
        inflight = manager.inflight()
    except Exception:  # noqa: BLE001 a backend loading or stopping right now: report what is safe
        return snapshot
    snapshot["backends"] = len(infos)
    snapshot["running"] = max(inflight, sum(int(i.running) for i in infos))
    snapshot["waiting"] = sum(int(i.waiting) for i in infos)
    snapshot["tokens_per_s"] = round(float(sum(float(i.tokens_per_s or 0) for i in infos)), 1)
    default = next((i for i in infos if i.default), None)
    if default is not None:
        snapshot.update(default=default.name, backend=default.backend, model=default.model)
    return snapshot


class LabBridge:
    """Comms to JupyterLab frontends: answers requests, pushes status while subscribed."""

    def __init__(self, get_manager: Callable[[], Any] = _existing_manager,
                 server_url: Callable[[], str | None] = _server_url, interval: float = INTERVAL):
        self.get_manager, self.server_url, self.interval = get_manager, server_url, interval
        self._lock = threading.RLock()
        self._comms: dict[str, Any] = {}  # every open comm, by id
        self._subscribed: set[str] = set()  # those whose frontend spoke: pushed to
        self._last: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    # --- comms ------------------------------------------------------------------------
    def attach(self, comm: Any, subscribe: bool = False) -> None:
        if hasattr(comm, "_reply_subshell_for"):
            # ipykernel 7 routes a frontend's comm messages to the subshell the kernel last
            # published from on that comm (for widgets awaiting replies). Our pushes come from
            # the main shell or a thread, which would send "stop" to the busy main shell: keep
            # the subshell the frontend chose instead.
            comm._reply_subshell_for = lambda data, default: default
        with self._lock:
            self._comms[comm.comm_id] = comm
            if subscribe:
                self._subscribe(comm)
        comm.on_msg(lambda msg, comm=comm: self.handle(comm, msg))
        comm.on_close(lambda msg, comm=comm: self.detach(comm))

    def detach(self, comm: Any) -> None:
        with self._lock:
            self._comms.pop(comm.comm_id, None)
            self._subscribed.discard(comm.comm_id)

    def open_from_kernel(self) -> Any:
        """Tell a frontend (if it has our labextension) that jupyter_llm is loaded."""
        from comm import create_comm

        comm = create_comm(target_name=TARGET, data=self.snapshot())
        self.attach(comm)
        return comm

    def on_frontend_open(self, comm: Any, msg: dict[str, Any]) -> None:
        """The comm target: a frontend opened a comm (e.g. after a page reload)."""
        self.attach(comm, subscribe=True)
        self._send(comm, self.snapshot())

    def close_all(self) -> None:
        with self._lock:
            comms = list(self._comms.values())
            self._comms.clear()
            self._subscribed.clear()
        for comm in comms:
            try:
                comm.close()
            except Exception:  # noqa: S110, BLE001 (a comm whose frontend went away)
                pass
        self._wake.set()

    # --- messages ---------------------------------------------------------------------
    def handle(self, comm: Any, msg: dict[str, Any]) -> None:
        data = (msg.get("content") or {}).get("data") or {}
        action = data.get("action")
        if action == "stop":
            manager = self.get_manager()
            cancelled = manager.cancel() if manager is not None else 0
            self._send(comm, {"type": "stopped", "cancelled": cancelled, "id": data.get("id")})
            self._wake.set()
        elif action == "table":
            try:
                manager = self.get_manager()
                rows = backend_rows(manager) if manager is not None else []
                self._send(comm, {"type": "table", "rows": rows, "id": data.get("id")})
            except Exception as error:  # noqa: BLE001 (sent to the frontend as an error message)
                self._send(comm, {"type": "error", "error": str(error), "id": data.get("id")})
        elif action == "status":
            with self._lock:
                self._subscribe(comm)
            self._send(comm, self.snapshot())
        else:
            self._send(comm, {"type": "error", "error": f"unknown action {action!r}", "id": data.get("id")})

    def snapshot(self) -> dict[str, Any]:
        return status(self.get_manager(), self.server_url)

    def _send(self, comm: Any, data: dict[str, Any]) -> None:
        with self._lock:  # one sender at a time (handlers on subshells, the push thread)
            try:
                comm.send(data)
            except Exception:  # noqa: S110, BLE001 (a frontend gone mid-send must not stop the others)
                pass

    # --- pushes ---------------------------------------------------------------------------
    def _subscribe(self, comm: Any) -> None:
        self._subscribed.add(comm.comm_id)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._push_loop, name="jupyter-llm-labext", daemon=True)
            self._thread.start()

    def _push_loop(self) -> None:
        while True:
            with self._lock:
                targets = [self._comms[i] for i in self._subscribed if i in self._comms]
                if not targets:
                    self._thread = None
                    return
            try:
                current = self.snapshot()
            except Exception:  # noqa: BLE001 (the push thread outlives a failing snapshot)
                current = None
            if current is not None and current != self._last:
                self._last = current
                for comm in targets:
                    self._send(comm, current)
            self._wake.wait(self.interval)
            self._wake.clear()


_bridge: LabBridge | None = None
_bridge_lock = threading.Lock()


def register(ipython: Any) -> LabBridge | None:
    """Register the comm target and greet the frontend. Does nothing outside a kernel."""
    global _bridge
    if getattr(ipython, "kernel", None) is None:
        return None
    try:
        from comm import get_comm_manager

        comm_manager = get_comm_manager()
    except Exception:  # noqa: BLE001 (outside a kernel there is no comm manager)
        return None
    with _bridge_lock:
        first = _bridge is None
        if first:
            _bridge = LabBridge()
        bridge = _bridge
    if first:
        comm_manager.register_target(TARGET, bridge.on_frontend_open)
    try:
        bridge.open_from_kernel()
    except Exception:  # noqa: S110, BLE001 (no frontend yet: it opens the comm itself)
        pass
    return bridge


def unregister(ipython: Any) -> None:
    global _bridge
    with _bridge_lock:
        bridge, _bridge = _bridge, None
    if bridge is None:
        return
    bridge.close_all()
    try:
        from comm import get_comm_manager

        get_comm_manager().unregister_target(TARGET, bridge.on_frontend_open)
    except Exception:  # noqa: S110, BLE001 (the kernel may be shutting down)
        pass
