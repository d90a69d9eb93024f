"""The machinery shared by in-process engines (hf, native, onnx, llamacpp): a compute thread
that steps a `StepEngine` over `EngineSequence`s, the per-sample output processing, and the
bridge to asyncio.

The compute thread owns the engine: requests and cancellations reach it through a
locked inbox, and events go back to each request's `EventMailbox` with
`call_soon_threadsafe`, so the manager's loop never waits on a forward pass.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from jupyter_llm.backends.base import Backend, check_prompt_fits
from jupyter_llm.backends.constraints import GrammarCompiler
from jupyter_llm.backends.meter import TokenMeter
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.backends.tokenizer_api import TokenizerServices
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.event_mailbox import EventMailbox
from jupyter_llm.output import SampleOutputProcessor
from jupyter_llm.schema import GenerationRequest, PreparedRequest, TokenEvent
from jupyter_llm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

LogprobEntry = tuple[float, list[int], list[float]]


class StepEngine(ABC):
    """The compute side of an in-process backend. Every method runs in the compute thread."""

    @abstractmethod
    def add(self, seq: EngineSequence) -> None:
        """Queue a new sequence."""

    @abstractmethod
    def remove(self, seq: EngineSequence) -> None:
        """Forget a sequence (finished, cancelled or failed) and free what it holds."""

    @abstractmethod
    def has_work(self) -> bool: ...

    @abstractmethod
    def step(self) -> list[tuple[EngineSequence, int, LogprobEntry | None]]:
        """Run one forward over the scheduled sequences; the sampled tokens in order: one per
        sequence that produced one (none for a sequence still in a chunked prefill, several
        for one whose speculative guesses were accepted)."""

    @abstractmethod
    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences."""

    def stats(self) -> dict[str, Any]:
        return {}


class InProcessBackend(TokenizerServices, Backend):
    """A backend whose engine steps in a compute thread of this process."""

    tokenizer: Tokenizer
    engine: StepEngine

    def __init__(self, model: str | None = None, **options: Any):
        super().__init__(model, **options)
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.meter = TokenMeter()
        self.step_threads = 0  # torch threads used by the latest step
        self._held = 0  # > 0 while a batch of requests is being submitted
        self._failure: str | None = None  # why the compute thread ended, when it failed

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """The constraints (structured output) compiled for this backend's tokenizer."""
        return GrammarCompiler(self.tokenizer)

    @property
    def threads(self) -> int:
        return self.options.threads or os.cpu_count() or 1

    # --- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"jupyter-llm-{self.kind}", daemon=True)
        self._thread.start()

    def _request_stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    async def stop(self) -> None:
        self._request_stop()
        # Poll rather than join in an executor: at interpreter exit executors refuse work, and a
        # compute thread still inside torch when the process ends aborts it.
        deadline = time.monotonic() + 30
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def join(self, timeout: float) -> bool:
        self._request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def health(self) -> str | None:
        if self._failure is not None:
            return self._failure
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return f"the compute thread of backend {self.kind!r} has stopped"
        return None

    # --- generation -------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check a request and tokenize its prompt (raises ParamError): the request with its prompt
        ids. One this backend prepared already comes back as it is, so nothing runs twice."""
        if isinstance(request, PreparedRequest) and request.backend is self:
            return request
        self.check_request(request)
        if request.params.structured is not None:  # compiled here, once, off the compute thread
            self.grammars.constraint(request.params.structured)
        prompt_ids = self.tokenizer.prompt_ids(request)
        if not prompt_ids:
            raise ParamError("the prompt is empty")
        check_prompt_fits(len(prompt_ids), self.max_model_len)
        return PreparedRequest.of(request, self, prompt_ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        request = self.prepare(request)
        prompt_ids = request.prompt_token_ids
        loop = asyncio.get_running_loop()
        mailbox = EventMailbox()  # a consumer that lags gets its samples' events folded, not queued

        def sink(event: TokenEvent) -> None:
            try:
                loop.call_soon_threadsafe(mailbox.put, event)
            except RuntimeError:  # the consumer's loop is gone
                pass

        structured = request.params.structured
        seqs = []
        for i in range(request.params.n):
            constraint = None if structured is None else self.grammars.constraint(structured)
            processor = SampleOutputProcessor(self.tokenizer, request.id, i, request.params, prompt_ids,
                                              self.max_model_len, constraint)
            seqs.append(EngineSequence(request, i, prompt_ids, processor, sink, constraint))
        self._post("add", seqs)
        remaining = len(seqs)
        try:
            while remaining:
                event = await mailbox.get()
                if event.finish_reason is not None:
                    remaining -= 1
                yield event
        finally:
            if remaining:
                self._post("abort", seqs)

    @contextlib.contextmanager
    def hold_admission(self) -> Iterator[None]:
        """Requests posted inside this block reach the engine together (one batch)."""
        with self._wake:
            self._held += 1
        try:
            yield
        finally:
            with self._wake:
                self._held -= 1
                self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Cancel a request by id, from any thread."""
        self._post("abort_id", request_id)

    def _post(self, kind: str, payload: Any) -> None:
        with self._wake:
            if self._failure is not None:  # no thread takes it any more
                if kind == "add":
                    raise BackendError(self._failure)
                return
            self._inbox.append((kind, payload))
            self._wake.notify()

    # --- compute thread ---------------------------------------------------------------
    def _run(self) -> None:
        live: dict[int, EngineSequence] = {}
        try:
            self._serve(live)
        except BaseException as error:  # the thread ends anyway (SystemExit...): nobody may wait on it
            log.error("the compute thread of backend %r failed", self.kind, exc_info=error)
            with self._wake:
                self._failure = f"the compute thread of backend {self.kind!r} failed and has stopped"
                waiting, self._inbox = list(self._inbox), deque()
            for seq in (seq for kind, payload in waiting if kind == "add" for seq in payload):
                live[seq.seq_id] = seq
            self._fail(live, error)  # and the thread ends, logged once

    def _serve(self, live: dict[int, EngineSequence]) -> None:
        while True:
            with self._wake:
                while (not self._inbox or self._held) and not self.engine.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                inbox: list[tuple[str, Any]] = []
                if not self._held:
                    inbox, self._inbox = list(self._inbox), deque()
            try:
                for kind, payload in inbox:
                    self._handle(kind, payload, live)
                if self.engine.has_work():
                    self._step(live)
            except Exception as error:  # logged; fails the requests it had, never the thread
                log.exception("engine step failed")
                self._fail(live, error)
        for seq in list(live.values()):
            self._end(seq, live, seq.processor.abort("cancelled"))

    def _handle(self, kind: str, payload: Any, live: dict[int, EngineSequence]) -> None:
        if kind == "add":
            for seq in payload:
                live[seq.seq_id] = seq
                self.engine.add(seq)
            return
        targets = payload if kind == "abort" else [s for s in live.values() if s.request_id == payload]
        for seq in targets:
            if seq.seq_id in live:
                self._end(seq, live, seq.processor.abort("cancelled"))

    def _end(self, seq: EngineSequence, live: dict[int, EngineSequence], event: TokenEvent) -> None:
        live.pop(seq.seq_id, None)
        try:
            self.engine.remove(seq)
        finally:
            seq.sink(event)

    def _fail(self, live: dict[int, EngineSequence], error: BaseException) -> None:
        """End every live request with `error`: a failure in a step, in output processing or in a
        request's bookkeeping costs the requests in flight, and the thread goes on serving."""
        message = f"{type(error).__name__}: {error}"
        for seq in list(live.values()):
            live.pop(seq.seq_id, None)
            try:
                self._end(seq, live, seq.processor.abort("error", message))
            except Exception:  # the next sequences must still be told
                log.exception("could not end a failed request")

    def _step(self, live: dict[int, EngineSequence]) -> None:
        import torch

        # torch's intra-op thread count is process-wide: each engine sets its own before each
        # step (cheap), so loading a second backend never changes the first's.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self.step_threads = torch.get_num_threads()
        outputs = self.engine.step()  # what raises here or below fails the live requests (_run)
        # Count before sending: a caller that sees its last event must also see its tokens counted.
        self.meter.add(len(outputs))
        for seq, token_id, logprob in outputs:
            if seq.seq_id not in live:  # ended by an earlier token of this step (speculative steps emit several)
                continue
            event = seq.processor.append(token_id, logprob)
            if seq.processor.finished:
                self._end(seq, live, event)
            else:
                seq.sink(event)

    # --- stats --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        running, waiting = self.engine.counts()
        grammars = self.grammars.stats() if "grammars" in self.__dict__ else {}  # once a constraint was asked for
        return {"running": running, "waiting": waiting, "tokens_generated": self.meter.tokens_generated,
                "tokens_per_s": self.meter.tokens_per_s(), **grammars, **self.engine.stats()}
