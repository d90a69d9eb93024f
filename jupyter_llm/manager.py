"""EngineManager: one per kernel. It owns an asyncio loop in a daemon thread, keeps
backends loaded under names, admits requests (the one bound on samples in flight, which the
server's --max-queue sets for its own requests), streams their events, folds them into
Completions (completions.py), and cancels from any thread.

Sync callers (magics, CLI) block on futures of that loop; async callers (server,
widgets) use `agenerate`/`astream` from their own loop: the work always runs on the
manager's loop, and events cross over through thread-safe queues.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_llm.backends import Backend, backend_availability, backend_class
from jupyter_llm.completions import CompletionBuilder, Prompt, build_requests
from jupyter_llm.errors import BackendError, NoBackendError, ParamError, QueueFullError
from jupyter_llm.event_mailbox import EventMailbox
from jupyter_llm.event_stream import EventStream
from jupyter_llm.heap import release_freed_memory
from jupyter_llm.schema import Completion, GenerationRequest, SamplingParams, TokenEvent

PREFERRED_BACKENDS = ("native", "hf")  # for the embedded model when nothing is loaded
_JOIN_TIMEOUT_S = 60.0  # at shutdown, the longest wait for a compute thread to finish its step


@dataclass
class BackendInfo:
    """One row of the `%llm_backend` status table."""

    name: str
    backend: str
    model: str
    device: str
    dtype: str
    default: bool
    state: str
    running: int = 0
    waiting: int = 0
    tokens_per_s: float = 0.0
    batching: str = ""  # "continuous", "static" (next batch) or "none" (one at a time)
    extra: dict[str, Any] = field(default_factory=dict)


class EngineManager:
    """Backends by name, one default, one event loop thread, bounded admission."""

    def __init__(self, max_queue: int = 256):
        self.max_queue = max_queue
        self._backends: dict[str, Backend] = {}
        self._default: str | None = None
        # request id -> (backend name, its samples, its task); admission counts samples
        self._inflight: dict[str, tuple[str, int, asyncio.Task]] = {}
        self._lock = threading.RLock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jupyter-llm-manager", daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)

    # --- the loop -----------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coroutine: Any) -> concurrent.futures.Future:
        """Run a coroutine on the manager's loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _run(self, coroutine: Any, timeout: float | None = None) -> Any:
        future = self.submit(coroutine)
        try:
            return future.result(timeout)
        except KeyboardInterrupt:
            future.cancel()
            raise

    # --- backends -----------------------------------------------------------------------
    def load(self, backend: str, model: str | None = None, name: str | None = None,
             progress: bool = True, **options: Any) -> BackendInfo:
        """Load a model on a backend kind under a name (default: the kind) and make it the default.
        Options are the backend's, with underscores (max_num_seqs=..., threads=...)."""
        name = name or backend
        ok, reason = backend_availability(backend)  # before importing the module: it needs the packages
        if not ok:
            raise BackendError(f"backend {backend!r} cannot load here: {reason}")
        instance = backend_class(backend)(model, **options)
        instance.load(progress=progress)
        release_freed_memory()  # what the load freed would otherwise stay resident
        old = self._backends.get(name)
        if old is not None:
            self._run(old.stop())
        self._run(instance.start())
        with self._lock:
            self._backends[name] = instance
            self._default = name
        return self.info(name)

    def load_default(self, progress: bool = True, **options: Any) -> BackendInfo:
        """The embedded model on the best backend that loads here (native, else hf), with the options."""
        kind = next((k for k in PREFERRED_BACKENDS if backend_availability(k)[0]), None)
        if kind is None:
            raise BackendError("none of the backends that run the embedded model can load here; "
                               "see jupyter_llm.available_backends()")
        return self.load(kind, progress=progress, **options)

    def unload(self, name: str | None = None) -> None:
        name = self.resolve_name(name)
        with self._lock:
            backend = self._backends.pop(name)
            if self._default == name:
                self._default = next(reversed(self._backends), None)
        self._run(backend.stop())

    def use(self, name: str) -> None:
        self.resolve_name(name)
        self._default = name

    @property
    def default(self) -> str | None:
        return self._default

    def resolve_name(self, name: str | None = None) -> str:
        with self._lock:
            if name is None:
                if self._default is None:
                    raise NoBackendError("no backend is loaded; load one with %llm_backend (e.g. %llm_backend hf)")
                return self._default
            if name not in self._backends:
                loaded = ", ".join(self._backends) or "none"
                raise NoBackendError(f"no backend named {name!r} is loaded (loaded: {loaded})")
            return name

    def get(self, name: str | None = None) -> Backend:
        return self._backends[self.resolve_name(name)]

    def names(self) -> list[str]:
        return list(self._backends)

    def info(self, name: str) -> BackendInfo:
        backend = self._backends[name]
        stats = backend.stats()
        return BackendInfo(name=name, backend=backend.kind, model=backend.model_name, device=backend.device,
                           dtype=backend.dtype, default=name == self._default, state="ready",
                           running=stats.get("running", 0), waiting=stats.get("waiting", 0),
                           tokens_per_s=stats.get("tokens_per_s", 0.0), batching=backend.capabilities.batching,
                           extra={k: v for k, v in stats.items() if k not in ("running", "waiting", "tokens_per_s")})

    def backends(self) -> list[BackendInfo]:
        return [self.info(name) for name in list(self._backends)]

    # --- generation -----------------------------------------------------------------------
    async def astream(self, requests: list[GenerationRequest], backend: str | None = None,
                      max_queue: int | None = None) -> AsyncIterator[TokenEvent]:
        """Events of several requests merged as they arrive (each tagged with its prompt index).
        Callable from any event loop; the work runs on the manager's loop. Each request is
        prepared by the backend once (one the backend prepared already is not checked again);
        `max_queue` bounds the samples in flight for this caller (default: the manager's)."""
        if asyncio.get_running_loop() is not self._loop:
            async for event in self._bridge(requests, backend, max_queue):
                yield event
            return
        name = self.resolve_name(backend)
        target = self._backends[name]
        requests = [target.prepare(request) for request in requests]
        limit = self.max_queue if max_queue is None else max_queue
        samples = sum(request.params.n for request in requests)
        if samples > limit:  # would never be admitted: the caller's to mend, not to retry
            raise ParamError(f"n and the prompts ask for {samples} samples in one call; at most {limit} are "
                             "admitted at once")
        with self._lock:
            if self.inflight() + samples > limit:
                raise QueueFullError(f"busy: {self.inflight()} samples in flight and {samples} asked for, "
                                     f"the limit is {limit}; retry later")
        merged = EventMailbox(producers=len(requests))  # folds a sample's events while the caller lags

        async def pump(prompt_index: int, request: GenerationRequest) -> None:
            unfinished = set(range(request.params.n))
            try:
                async for event in target.generate(request):
                    event.prompt_index = prompt_index
                    if event.finish_reason is not None:
                        unfinished.discard(event.index)
                    merged.put(event)
            except asyncio.CancelledError:  # cancel(request_id): end its samples as cancelled
                for index in sorted(unfinished):
                    merged.put(TokenEvent(request.id, index, finish_reason="cancelled", prompt_index=prompt_index))
            except Exception as error:  # noqa: BLE001 (the error reaches the caller through the mailbox)
                merged.fail(error)
            finally:
                with self._lock:
                    self._inflight.pop(request.id, None)
                merged.close()

        tasks = []
        try:  # from the first pump on: a caller cancelled in any await below cancels every pump
            with target.hold_admission():
                with self._lock:
                    for i, request in enumerate(requests):
                        task = asyncio.ensure_future(pump(i, request))
                        self._inflight[request.id] = (name, request.params.n, task)
                        tasks.append(task)
                await asyncio.sleep(0)  # each pump runs up to its first wait: every request is submitted
            while (event := await merged.get()) is not None:
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _bridge(self, requests: list[GenerationRequest], backend: str | None,
                      max_queue: int | None) -> AsyncIterator[TokenEvent]:
        """astream for a caller on another loop: run on the manager's loop, hand events over."""
        caller = asyncio.get_running_loop()
        handoff = EventMailbox()  # on the caller's loop: what the caller has not taken yet, folded

        async def run() -> None:
            try:
                async for event in self.astream(requests, backend, max_queue):
                    caller.call_soon_threadsafe(handoff.put, event)
            except BaseException as error:  # noqa: BLE001 (handed to the caller's loop, which raises it)
                caller.call_soon_threadsafe(handoff.fail, error)
            finally:
                caller.call_soon_threadsafe(handoff.close)

        future = self.submit(run())
        try:
            while (event := await handoff.get()) is not None:
                yield event
        finally:
            future.cancel()

    async def agenerate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                        backend: str | None = None, chat: bool = False, system: str | None = None
                        ) -> list[Completion]:
        requests = build_requests(prompts, params, chat, system)
        target = self.get(backend)
        builder = CompletionBuilder(requests, target.kind, target.model_name)
        async for event in self.astream(requests, backend):
            builder.add(event)
        return builder.completions()

    def stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
               backend: str | None = None, chat: bool = False, system: str | None = None) -> EventStream:
        """A sync iterator of TokenEvents; its `.completions` hold the results."""
        return EventStream(self, build_requests(prompts, params, chat, system), backend)

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 backend: str | None = None, chat: bool = False, system: str | None = None) -> list[Completion]:
        """All prompts at once as one batch; a flat list of Completions in prompt order."""
        stream = self.stream(prompts, params, backend, chat, system)
        try:
            return stream.wait()
        finally:
            stream.close()

    def cancel(self, request_id: str | None = None) -> int:
        """Cancel one request (or every request when None), from any thread. Returns how many."""
        with self._lock:
            targets = [task for rid, (_, _, task) in self._inflight.items() if request_id in (None, rid)]
        for task in targets:
            self._loop.call_soon_threadsafe(task.cancel)
        return len(targets)

    def inflight(self) -> int:
        """Samples in flight (a request of n samples counts n)."""
        with self._lock:
            return sum(samples for _, samples, _ in self._inflight.values())

    # --- shutdown -----------------------------------------------------------------------
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every backend and the loop. Runs at exit by itself."""
        if not self._loop.is_running():
            return
        for name in list(self._backends):
            backend = self._backends.pop(name)
            try:
                self._run(backend.stop(), timeout)
            except Exception:  # noqa: S110, BLE001 at exit, nothing may raise
                pass
            # Then, without the loop (a starved or stuck loop must not leave a compute thread inside
            # torch or llama.cpp when the interpreter finalizes: that aborts the process).
            backend.join(_JOIN_TIMEOUT_S)
        self._default = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


_manager: EngineManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> EngineManager:
    """The kernel's one manager, created on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = EngineManager()
        return _manager
