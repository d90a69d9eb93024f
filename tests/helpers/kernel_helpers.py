"""A real ipykernel driven through jupyter_client, for tests that need a kernel."""
from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jupyter_client import KernelManager


@dataclass
class CellResult:
    outputs: list[dict] = field(default_factory=list)
    reply: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Everything shown: streams, display data, updates and errors, as plain text."""
        parts = []
        for msg in self.outputs:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                parts.append(content["text"])
            elif msg["msg_type"] in ("display_data", "update_display_data", "execute_result"):
                parts.append(content["data"].get("text/plain", ""))
            elif msg["msg_type"] == "error":
                parts.append(f"{content['ename']}: {content['evalue']}")
        return "\n".join(parts)

    @property
    def errors(self) -> list[dict]:
        return [m["content"] for m in self.outputs if m["msg_type"] == "error"]


class Kernel:
    def __init__(self) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 300, on_output: Callable[[dict], None] | None = None) -> CellResult:
        """Execute code and collect its outputs until the kernel is idle again."""
        msg_id = self.kc.execute(code)
        result = CellResult()
        deadline = time.time() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                raise TimeoutError(f"no idle status within {timeout}s for: {code[:60]!r}")
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            if msg["msg_type"] in ("stream", "display_data", "update_display_data", "execute_result", "error"):
                result.outputs.append(msg)
                if on_output is not None:
                    on_output(msg)
        result.reply = self.kc.get_shell_msg(timeout=30)["content"]
        return result

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
