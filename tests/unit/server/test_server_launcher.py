"""The server in a background thread (what %llm_serve runs): free ports, clear errors for a
taken port, stop freeing the port, status; and the magic in a real InteractiveShell."""
import re
import socket
import threading

import httpx
import pytest
from IPython.core.error import UsageError

from jupyter_llm.errors import ServerError
from jupyter_llm.server import launcher as runner
from jupyter_llm.server.launcher import start_server
from jupyter_llm.server.settings import ServerSettings
from server_helpers import running_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_zero_picks_a_free_port_and_status_counts(manager, tiny_hf):
    with running_server(manager) as handle:
        assert handle.port > 0 and handle.url == f"http://127.0.0.1:{handle.port}"
        httpx.post(handle.url + "/v1/completions", json={"model": "tiny-hf", "prompt": "Hi", "max_tokens": 2})
        httpx.post(handle.url + "/v1/completions", json={"model": "nope", "prompt": "Hi"})
        status = handle.status()
        assert status["url"] == handle.url + "/v1" and status["state"] == "running"
        assert status["requests served"] == 1 and status["errors"] == 1 and status["in flight"] == 0
        assert re.fullmatch(r"\d+m\d\ds", status["uptime"])
        assert handle in runner.running_servers()
    assert handle not in runner.running_servers()


def test_starting_twice_on_one_port_is_a_clear_error_and_stop_frees_it(manager, tiny_hf):
    port = free_port()
    handle = start_server(manager, ServerSettings(port=port))
    try:
        with pytest.raises(ServerError, match=f"a server already runs on port {port}.*--stop"):
            start_server(manager, ServerSettings(port=port))
    finally:
        handle.stop()
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
    again = start_server(manager, ServerSettings(port=port))
    try:
        assert httpx.get(again.url + "/health").status_code == 200
    finally:
        again.stop()


def test_a_port_taken_by_another_program_is_a_clear_error(manager):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ServerError, match=f"cannot listen on 127.0.0.1:{port}: it is already in use"):
            start_server(manager, ServerSettings(port=port))


def test_banner_has_url_models_and_snippets():
    text = runner.banner("http://127.0.0.1:9", ["a", "b"], "b", "$MY_KEY", "stop hint")
    assert "http://127.0.0.1:9/v1" in text and "a, b (default)" in text
    assert 'curl http://127.0.0.1:9/v1/chat/completions' in text and 'Bearer $MY_KEY' in text
    assert 'OpenAI(base_url="http://127.0.0.1:9/v1", api_key=os.environ["MY_KEY"])' in text
    assert 'model="b"' in text and text.endswith("stop hint")
    assert 'api_key="none"' in runner.banner("http://h:1", [], None, None, "")


def test_the_magic_starts_reports_and_stops_while_generate_still_works(shell, tiny_hf, capsys):
    shell.run_cell("%llm_backend --use tiny-hf")
    capsys.readouterr()
    shell.run_cell("%llm_serve --port 0")
    out = capsys.readouterr().out
    url = re.search(r"server at (http://127\.0\.0\.1:\d+)/v1", out).group(1)
    assert "tiny-hf (default)" in out and "curl " in out and "from openai import OpenAI" in out
    try:
        result = {}
        body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
        caller = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                              timeout=60)))
        caller.start()
        shell.run_cell("%%generate --max-tokens 5 --ignore-eos --no-stream -o answers\nOnce upon a time")
        assert shell.user_ns["answers"][0].completion_tokens == 5
        caller.join(60)
        assert result["r"].status_code == 200
        port = url.rsplit(":", 1)[1]
        with pytest.raises(UsageError, match=f"already runs on port {port}"):
            shell.run_cell(f"%llm_serve --port {port}")
        capsys.readouterr()
        shell.run_cell("%llm_serve --status")
        status = capsys.readouterr().out
        assert url in status and "requests served" in status
    finally:
        shell.run_cell("%llm_serve --stop")
    assert f"stopped the server at {url}" in capsys.readouterr().out
    shell.run_cell("%llm_serve --status")
    assert "no server is running" in capsys.readouterr().out
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


@pytest.mark.parametrize("line,message", [
    ("%llm_serve --rate-limit fast", "--rate-limit expects N/s"),
    ("%llm_serve --port -1", "--port must be in [0, 65535]"),
    ("%llm_serve --api-key-env NO_SUCH_VAR_HERE", "NO_SUCH_VAR_HERE"),
    ("%llm_serve --bogus", "unrecognized arguments: --bogus"),
])
def test_bad_serve_options_are_one_line_usage_errors(shell, line, message):
    with pytest.raises(UsageError) as info:
        shell.run_cell(line)
    assert message in str(info.value) and "\n" not in str(info.value)



def test_the_magic_takes_the_limits_of_the_server(shell, tiny_hf, capsys):
    shell.run_cell("%llm_backend --use tiny-hf")
    shell.run_cell("%llm_serve --port 0 --stream-write-timeout 2.5 --max-request-tokens 300 --max-queue 8")
    url = re.search(r"server at (http://127\.0\.0\.1:\d+)/v1", capsys.readouterr().out).group(1)
    try:
        [handle] = [h for h in runner.running_servers() if h.url == url]
        settings = handle.settings
        assert (settings.stream_write_timeout, settings.max_request_tokens, settings.max_queue) == (2.5, 300, 8)
        too_much = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "n": 4, "max_tokens": 100}, timeout=60)
        assert too_much.status_code == 400 and too_much.json()["error"]["code"] == "request_too_large"
        with pytest.raises(UsageError, match="--stream-write-timeout must be a positive number"):
            shell.run_cell("%llm_serve --port 0 --stream-write-timeout 0")
    finally:
        shell.run_cell("%llm_serve --stop")
