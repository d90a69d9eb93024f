"""The sampling playground: a prompt, every sampling control, and the output streaming in,
coloured by probability, one column per sample and per backend.

Threads: the browser's messages arrive on the kernel's shell thread, or on a subshell
thread while a cell runs (ipykernel 7, JupyterLab 4.4+); generations run on the manager's
loop thread. Every state change and message this class makes goes through `self._lock`.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
from pathlib import Path
from typing import Any

import anywidget
from traitlets import Bool, Float, Int, List, TraitError, Unicode, observe

from jupyter_llm.completions import build_requests
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.manager import get_manager
from jupyter_llm.notebook.widgets.generation import Generation, Message
from jupyter_llm.schema import Completion, SamplingParams

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_run_ids = itertools.count(1)

# Traits that make up `.params`; a change re-validates them.
PARAM_TRAITS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "seed", "seed_locked", "stop_strings", "n",
                "logprobs", "ignore_eos")
# The settings the browser sends with its generate message (SETTINGS in playground.js): ipywidgets
# sends one state update at a time and holds later ones back until the kernel has answered, but a
# custom message goes at once, so Generate could overtake a prompt or a setting still held back.
SETTINGS = ("prompt", "chat", "system", "backend", "compare") + PARAM_TRAITS


class Playground(anywidget.AnyWidget):
    """`Playground()` in a cell (or `%llm_playground`). From Python: `.prompt`, `.params`,
    `.generate()`, `.stop()`, `.wait(timeout)`, `.completions`."""

    _esm = _HERE / "playground.js"
    _css = _HERE / "playground.css"

    prompt = Unicode("").tag(sync=True)
    chat = Bool(False, help="send the prompt as a user message through the chat template").tag(sync=True)
    system = Unicode("", help="system prompt (chat mode)").tag(sync=True)
    backend = Unicode("", help="loaded backend name (empty: the manager's default)").tag(sync=True)
    compare = Unicode("", help="a second backend given the same settings (empty: none)").tag(sync=True)
    backends = List(Unicode(), help="the loaded backends, for the pickers").tag(sync=True)

    max_tokens = Int(128).tag(sync=True)
    temperature = Float(0.7).tag(sync=True)
    top_p = Float(1.0).tag(sync=True)
    top_k = Int(0).tag(sync=True)
    min_p = Float(0.0).tag(sync=True)
    repetition_penalty = Float(1.0).tag(sync=True)
    presence_penalty = Float(0.0).tag(sync=True)
    frequency_penalty = Float(0.0).tag(sync=True)
    seed = Int(0, help="the seed of the last (or next, when locked) generation").tag(sync=True)
    seed_locked = Bool(False, help="reuse `seed`; unlocked, each generation draws a new one").tag(sync=True)
    stop_strings = List(Unicode()).tag(sync=True)
    n = Int(1, help="samples, shown side by side").tag(sync=True)
    logprobs = Int(5, help="top alternatives per token, for colouring and hover (0: off)").tag(sync=True)
    ignore_eos = Bool(False).tag(sync=True)

    running = Bool(False, read_only=True).tag(sync=True)
    error = Unicode("", help="the last error, shown in the widget").tag(sync=True)

    def __init__(self, prompt: str = "", params: SamplingParams | None = None, **kwargs: Any):
        # Before the traits: setting them runs the observers, which use these.
        self._lock = threading.RLock()
        self._generation: Generation | None = None
        self._completions: list[Completion] = []
        self._history: list[Message] = []  # the current run's messages, replayed to new views
        self._param_error = ""
        self.manager = get_manager()
        super().__init__(prompt=prompt, **kwargs)
        if params is not None:
            self.params = params
        self._refresh_backends()
        if not self.backend:
            self.backend = self.manager.default or ""
        self.on_msg(self._on_frontend_msg)

    def __repr__(self) -> str:
        # The text/plain fallback where widgets do not render (nbconvert, a terminal).
        compare = f", compare={self.compare!r}" if self.compare else ""
        prompt = self.prompt if len(self.prompt) <= 40 else self.prompt[:39] + "…"
        return f"Playground(backend={self.backend!r}{compare}, prompt={prompt!r})"

    # --- settings -------------------------------------------------------------------
    @property
    def params(self) -> SamplingParams:
        """The current settings (raises ParamError when one is out of range)."""
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed if self.seed_locked else None, stop=tuple(self.stop_strings), n=self.n,
            logprobs=self.logprobs or None, ignore_eos=self.ignore_eos)

    @params.setter
    def params(self, value: SamplingParams) -> None:
        with self._lock, self.hold_sync():
            for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                         "presence_penalty", "frequency_penalty", "n", "ignore_eos"):
                setattr(self, name, getattr(value, name))
            self.stop_strings = list(value.stop)
            self.logprobs = value.logprobs or 0
            self.seed_locked = value.seed is not None
            if value.seed is not None:
                self.seed = value.seed

    @observe(*PARAM_TRAITS)
    def _check_params(self, change: Any) -> None:
        try:
            _ = self.params  # building the params validates them
        except ParamError as error:
            self.error = self._param_error = str(error)
            return
        if self.error and self.error == self._param_error:
            self.error = ""
        self._param_error = ""

    def set_state(self, sync_data: dict[str, Any]) -> None:
        """A state update from the browser: a value of the wrong type becomes the error
        message (and the browser gets the Python values back), never an exception."""
        with self._lock:
            try:
                super().set_state(sync_data)
            except TraitError as error:
                self.error = self._param_error = f"invalid value: {error}"
                self.send_state([key for key in sync_data if key in self.keys])

    # --- generation -------------------------------------------------------------------
    def generate(self) -> None:
        """Start generating with the current settings, as the Generate button does, and return
        at once; the manager's thread does the work. A generation still running is stopped."""
        with self._lock:
            if self._generation is not None and not self._generation.done.is_set():
                self._generation.stop()
            try:
                generation = self._new_generation()
            except (ParamError, BackendError) as error:
                self.error = str(error)
                return
            self.error = self._param_error = ""
            self._generation = generation
            self._history = []
            self.set_trait("running", True)
            generation.start()

    def _new_generation(self) -> Generation:
        self._refresh_backends()
        if not self.prompt.strip():
            raise ParamError("the prompt is empty: write one first")
        if not self.seed_locked:
            self.seed = random.randrange(2**31)
        params = self.params.replace(seed=self.seed)  # the snapshot: later changes do not touch this run
        names = [self.manager.resolve_name(self.backend or None)]
        if self.compare:
            names.append(self.manager.resolve_name(self.compare))
        requests = []
        for name in names:
            backend = self.manager.get(name)
            # Colouring needs logprobs; a backend without them still streams plain text.
            wanted = params if backend.capabilities.logprobs else params.replace(logprobs=None)
            [request] = build_requests(self.prompt, wanted, chat=self.chat, system=self.system or None)
            requests.append((name, backend.prepare(request)))  # checked and tokenized once, here
        return Generation(self.manager, next(_run_ids), requests, self._send_message, self._finished)

    def stop(self) -> None:
        """Cancel the running generation inside its backends (from any thread); output so far is kept."""
        with self._lock:
            generation = self._generation
        if generation is not None:
            generation.stop()

    def wait(self, timeout: float | None = None) -> list[Completion]:
        """Block until the running generation ends; its completions. TimeoutError after `timeout` s."""
        generation = self._generation
        if generation is None:
            return self.completions
        try:
            if not generation.done.wait(timeout):
                raise TimeoutError(f"the generation did not end within {timeout} s (it goes on; .stop() ends it)")
        except KeyboardInterrupt:
            self.stop()
            raise
        return self.completions

    def close(self) -> None:
        """Stop a running generation, then close the widget."""
        with contextlib.suppress(RuntimeError):  # at interpreter exit the manager's loop may be closed
            self.stop()
        super().close()

    @property
    def completions(self) -> list[Completion]:
        """The last generation's results: the samples of `backend`, then those of `compare`."""
        with self._lock:
            return list(self._completions)

    def _finished(self, generation: Generation) -> None:
        """Called on the manager's loop when a generation ends."""
        with self._lock:
            if generation is not self._generation:
                return  # replaced by a newer one
            self._completions = generation.completions
            if generation.errors:
                self.error = "; ".join(generation.errors)
            self.set_trait("running", False)

    # --- messages -------------------------------------------------------------------------
    def _send_message(self, message: Message) -> None:
        with self._lock:
            self._history.append(message)
            self.send(message)

    def _on_frontend_msg(self, widget: Any, content: Any, buffers: Any) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        settings = content.get("settings") if kind == "generate" else None
        with self._lock:
            self._handle(kind, settings if isinstance(settings, dict) else None)

    def _handle(self, kind: str | None, settings: dict[str, Any] | None = None) -> None:
        try:
            if kind == "generate":
                if settings:  # the values on show when Generate was pressed
                    self.set_state({key: value for key, value in settings.items() if key in SETTINGS})
                self.generate()
            elif kind == "stop":
                self.stop()
            elif kind == "hello":  # a new view: give it the backends and the current output
                self._refresh_backends()
                for message in self._history:
                    self.send(message)
        except Exception as error:  # a comm handler must not raise: show it instead
            log.exception("playground message %r failed", kind)
            self.error = f"{type(error).__name__}: {error}"

    def _refresh_backends(self) -> None:
        self.backends = self.manager.names()
