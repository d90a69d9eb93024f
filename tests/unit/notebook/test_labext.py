"""The kernel side of the labextension (jupyter_llm/labext.py) with fake comms and a fake manager."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from jupyter_llm.notebook import labext


class FakeComm:
    def __init__(self, comm_id="c1"):
        self.comm_id, self.sent, self.closed = comm_id, [], False
        self.msg_handler = self.close_handler = None

    def send(self, data):
        self.sent.append(data)

    def on_msg(self, handler):
        self.msg_handler = handler

    def on_close(self, handler):
        self.close_handler = handler

    def close(self):
        self.closed = True

    def message(self, **data):
        self.msg_handler({"content": {"comm_id": self.comm_id, "data": data}})


def info(**kw):
    row = {"name": "tiny", "backend": "hf", "model": "/tmp/tiny-llama", "device": "cpu", "dtype": "float32",
           "default": True, "state": "ready", "running": 0, "waiting": 0, "tokens_per_s": 0.0, "batching": "static",
           "extra": {"threads": 1}}
    row.update(kw)
    return SimpleNamespace(**row)


class FakeManager:
    def __init__(self):
        self.rows, self.cancelled, self.inflight_count = [info()], [], 0
        self.cancel_thread = None

    def backends(self):
        return self.rows

    def inflight(self):
        return self.inflight_count

    def cancel(self, request_id=None):
        self.cancel_thread = threading.current_thread()
        self.cancelled.append(request_id)
        return self.inflight_count


def test_status_without_manager_and_with(monkeypatch):
    import jupyter_llm.manager

    monkeypatch.setattr(jupyter_llm.manager, "_manager", None)  # other tests may have created one
    assert labext.status(None, lambda: None) == {
        "type": "status", "loaded": True, "default": None, "backend": None, "model": None, "running": 0,
        "waiting": 0, "tokens_per_s": 0.0, "backends": 0, "server_url": None}
    manager = FakeManager()
    manager.rows = [info(running=2, tokens_per_s=12.34), info(name="other", default=False, waiting=1)]
    snapshot = labext.status(manager, lambda: "http://127.0.0.1:8000/v1")
    assert snapshot["default"] == "tiny" and snapshot["backend"] == "hf" and snapshot["model"] == "/tmp/tiny-llama"
    assert snapshot["running"] == 2 and snapshot["waiting"] == 1 and snapshot["tokens_per_s"] == 12.3
    assert snapshot["backends"] == 2 and snapshot["server_url"] == "http://127.0.0.1:8000/v1"


def test_server_url_only_when_the_runner_was_imported(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "jupyter_llm.server.launcher", raising=False)
    assert labext._server_url() is None
    fake = SimpleNamespace(running_servers=lambda: [SimpleNamespace(url="http://127.0.0.1:9")])
    monkeypatch.setitem(sys.modules, "jupyter_llm.server.launcher", fake)
    assert labext._server_url() == "http://127.0.0.1:9/v1"


def test_requests_table_and_stop_from_another_thread():
    manager = FakeManager()
    manager.inflight_count = 3
    bridge = labext.LabBridge(get_manager=lambda: manager, server_url=lambda: None, interval=0.01)
    comm = FakeComm()
    bridge.attach(comm)
    comm.message(action="table", id="t1")
    assert comm.sent[-1]["type"] == "table" and comm.sent[-1]["id"] == "t1"
    assert comm.sent[-1]["rows"][0]["name"] == "tiny" and comm.sent[-1]["rows"][0]["details"] == "threads=1"
    # A subshell thread handles "stop" while the main thread is busy.
    worker = threading.Thread(target=comm.message, kwargs={"action": "stop", "id": "s1"})
    worker.start()
    worker.join(5)
    assert manager.cancelled == [None] and manager.cancel_thread is worker
    assert {"type": "stopped", "cancelled": 3, "id": "s1"} in comm.sent
    comm.message(action="dance")
    assert comm.sent[-1]["type"] == "error"
    bridge.close_all()


def test_pushes_only_when_subscribed_and_changed():
    manager = FakeManager()
    bridge = labext.LabBridge(get_manager=lambda: manager, server_url=lambda: None, interval=0.01)
    comm = FakeComm()
    bridge.attach(comm)
    time.sleep(0.05)
    assert comm.sent == [] and bridge._thread is None  # a frontend without our extension costs nothing
    comm.message(action="status")  # subscribes
    time.sleep(0.1)
    statuses = [m for m in comm.sent if m["type"] == "status"]
    assert len(statuses) == 2  # the reply and one push: nothing changed since
    manager.rows = [info(running=1, tokens_per_s=50.0)]
    deadline = time.monotonic() + 2
    while not any(m.get("running") == 1 for m in comm.sent) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(m.get("running") == 1 and m["tokens_per_s"] == 50.0 for m in comm.sent)
    comm.close_handler({})  # the frontend closed it: the thread ends
    deadline = time.monotonic() + 2
    while bridge._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bridge._thread is None


def test_stop_keeps_the_frontends_subshell():
    bridge = labext.LabBridge(get_manager=lambda: None, server_url=lambda: None)
    comm = FakeComm()
    comm._reply_subshell_for = lambda data, default: None  # ipykernel 7: the last publisher's subshell
    bridge.attach(comm)
    assert comm._reply_subshell_for({"action": "stop"}, "subshell-1") == "subshell-1"


def test_register_does_nothing_outside_a_kernel():
    assert labext.register(SimpleNamespace()) is None


def test_load_ext_stays_light():
    import subprocess
    import sys

    code = ("import sys; from IPython.testing.globalipapp import start_ipython; ip = start_ipython(); "
            "ip.run_line_magic('load_ext', 'jupyter_llm'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
