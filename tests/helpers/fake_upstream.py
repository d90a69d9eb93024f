"""A scripted OpenAI-compatible upstream on a local port, in a thread of the test process: it
answers 429/503, drops connections, stalls, breaks off or streams on cue as vLLM streams, and
records every body it was sent. For the openai backend's tests, in-process and behind a real
`jupyter-llm serve`."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Script:
    """What the next POSTs answer: ("status", code, headers) | ("drop",) | ("stream", tokens, delay)
    | ("break", tokens[, delay]) | ("stall", seconds) (then 4 tokens) | ("error event", message) (after a
    token). With nothing scripted, a request streams 4 tokens."""

    def __init__(self):
        self.actions: deque = deque()
        self.posts = 0
        self.bodies: list[dict] = []
        self.client_gone = threading.Event()


def handler_for(script: Script):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                               **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._json(200, {"object": "list", "data": [{"id": "fake", "owned_by": "vllm", "max_model_len": 64}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.posts += 1
            script.bodies.append(body)
            action = script.actions.popleft() if script.actions else ("stream", 4, 0.0)
            if action[0] == "status":
                self._json(action[1], {"error": {"message": f"scripted {action[1]}"}}, action[2])
            elif action[0] == "error event":  # as vLLM reports a failure once the stream started
                self._stream(1, 0.0, body, broken=True, error=action[1])
            elif action[0] == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif action[0] == "stream":
                self._stream(action[1], action[2], body)
            elif action[0] == "stall":
                time.sleep(action[1])
                self._stream(4, 0.0, body)
            else:  # ("break", tokens[, delay])
                self._stream(action[1], action[2] if len(action) > 2 else 0.0, body, broken=True)

        def _stream(self, tokens: int, delay: float, body: dict, broken: bool = False, error: str = "") -> None:
            """As vLLM streams: one choice per chunk, `n` choices interleaved; a token whose text is
            a stop string ends its choice with finish_reason "stop" and stop_reason, unshown."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            stops, live = body.get("stop") or [], set(range(body.get("n", 1)))
            chat = self.path.endswith("/chat/completions")
            try:
                for i in range(tokens):
                    for index in sorted(live):
                        text = f" t{i}" if index == 0 else f" t{i}.{index}"
                        choice = {"index": index, "text": text, "token_ids": [100 + i + 10 * index],
                                  "finish_reason": "length" if i == tokens - 1 and not broken else None}
                        if text in stops:
                            choice.update(text="", token_ids=[], finish_reason="stop", stop_reason=text)
                            live.discard(index)
                        if chat:  # a chat chunk carries its text in a delta
                            choice["delta"] = {"content": choice.pop("text")}
                        self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(delay)
                if error:
                    self.wfile.write(f"data: {json.dumps({'error': {'message': error}})}\n\n".encode())
                    self.wfile.flush()
                    return
                if broken:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens}}
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                script.client_gone.set()

    return Handler


@contextmanager
def fake_upstream() -> Iterator[tuple[Script, str]]:
    """(the script, the server's URL without /v1), shut down afterwards."""
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(script))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield script, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
