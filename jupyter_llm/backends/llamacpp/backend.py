"""The llama.cpp backend (llama-cpp-python, in process): GGUF files, the embedded SmolLM2 by default.

llama.cpp evaluates the tokens; everything after the logits is shared code. The compute
thread of `InProcessBackend` steps a `LlamaCppStepEngine`: each step evaluates one prompt
chunk or one token of ONE sequence (llama-cpp-python runs one sequence at a time per
model), copies the last logits out and samples them with the shared `Sampler`, so seeds,
penalties, top-k/top-p/min-p and logprobs behave exactly as on the other in-process
backends, and logprobs need no `logits_all` (only the last position's logits are read).
Cancellation takes effect between two steps, i.e. between tokens. Requests wait in one
FIFO queue; the n samples of a request run one after the other.

`llama_cpp` is imported only once the probe passed (in `load`, and by what runs after it):
a build compiled for another CPU is found out in a subprocess before it runs in this one.
"""
from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.inprocess import InProcessBackend, LogprobEntry, StepEngine
from jupyter_llm.backends.llamacpp.probe import probe
from jupyter_llm.backends.options import BackendOptions
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.errors import BackendError
from jupyter_llm.model_files import resolve_model
from jupyter_llm.progress import steps
from jupyter_llm.sampling import Sampler
from jupyter_llm.tokenizers import gguf_tokenizer

if TYPE_CHECKING:
    from llama_cpp import Llama

DEFAULT_N_CTX = 4096


@dataclass
class LlamaCppOptions(BackendOptions):
    n_threads: int | None = None  # llama.cpp threads (default: --threads, else every core)
    n_ctx: int = DEFAULT_N_CTX  # context size (capped by the model's training context)
    n_gpu_layers: int = 0  # layers offloaded to the GPU (-1: all); needs a GPU build
    n_batch: int = 512  # prompt tokens evaluated per step


class LlamaCppStepEngine(StepEngine):
    """One sequence at a time: prefill it in chunks of n_batch, then one token per step."""

    def __init__(self, llama: Llama, n_batch: int):
        self.llama = llama
        self.n_batch = n_batch
        self.sampler = Sampler()
        self.waiting: deque[EngineSequence] = deque()
        self.current: EngineSequence | None = None
        self.evaluated = 0  # prompt tokens of `current` already in the KV cache

    def add(self, seq: EngineSequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: EngineSequence) -> None:
        if seq is self.current:
            self.current = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return self.current is not None or bool(self.waiting)

    def counts(self) -> tuple[int, int]:
        return int(self.current is not None), len(self.waiting)

    def stats(self) -> dict[str, str]:
        return {"batching": "none (one sequence at a time)"}

    def step(self) -> list[tuple[EngineSequence, int, LogprobEntry | None]]:
        if self.current is None:
            self.current = self.waiting.popleft()
            self.evaluated = 0
            self.llama.reset()  # no KV reuse across requests: the same prompt always evaluates the same way
        seq = self.current
        if self.evaluated < seq.num_prompt_tokens:
            chunk = seq.token_ids[self.evaluated:min(self.evaluated + self.n_batch, seq.num_prompt_tokens)]
            self.llama.eval(chunk)
            self.evaluated += len(chunk)
            if self.evaluated < seq.num_prompt_tokens:
                return []  # more prompt chunks first; a cancel can land in between
        else:
            self.llama.eval(seq.token_ids[-1:])  # the last sampled token
        sampled = self.sampler(self._last_logits(), [seq.sampling])
        return [(seq, sampled.token_ids[0], sampled.logprobs[0])]

    def _last_logits(self) -> torch.Tensor:
        import llama_cpp  # loaded already (after the probe): see the module's docstring

        pointer = llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        row = np.ctypeslib.as_array(pointer, shape=(self.llama.n_vocab(),))
        return torch.from_numpy(row.copy()).unsqueeze(0)


def model_description(llama: Llama) -> str:
    """llama.cpp's one-line description, e.g. 'llama 135M Q4_1'."""
    import llama_cpp  # loaded already (after the probe): see the module's docstring

    buffer = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llama.model, buffer, ctypes.sizeof(buffer))
    return buffer.value.decode("utf-8", "replace")


class LlamaCppBackend(InProcessBackend):
    kind = "llamacpp"
    options_class = LlamaCppOptions
    capabilities = Capabilities(batching="none", structured=True, devices=("cpu", "gpu"))

    def load(self, progress: bool = True) -> None:
        spec = resolve_model(self.model_arg)
        verdict = probe(spec.path if spec.is_gguf else None)
        if not verdict.ok:
            raise BackendError(verdict.reason)
        import llama_cpp  # only now: see the module's docstring

        options: LlamaCppOptions = self.options  # type: ignore[assignment]
        if options.n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            raise BackendError("--n-gpu-layers needs llama-cpp-python built with GPU support; this build runs "
                               "on CPU only (reinstall with CMAKE_ARGS='-DGGML_CUDA=on' pip install "
                               "--force-reinstall llama-cpp-python)")
        if options.n_ctx < 16 or options.n_batch < 1:
            raise BackendError(f"--n-ctx must be >= 16 and --n-batch >= 1 (got {options.n_ctx}, {options.n_batch})")
        if not spec.is_gguf:
            raise BackendError(f"the llamacpp backend reads .gguf files; {spec.name!r} is not one "
                               f"(give a .gguf path, or use the hf or native backend)")
        threads = options.n_threads or self.threads
        with steps(progress, f"Loading {spec.name} (llama.cpp)", 1) as bar:
            llama = llama_cpp.Llama(spec.path, n_ctx=options.n_ctx, n_batch=options.n_batch,
                                    n_threads=threads, n_threads_batch=threads,
                                    n_gpu_layers=options.n_gpu_layers, verbose=False)
            bar.update(1)
        self.llama = llama
        self.tokenizer = gguf_tokenizer(llama)
        self.model_name = spec.name
        self.dtype = model_description(llama).rsplit(" ", 1)[-1]
        self.device = "cpu" if not options.n_gpu_layers else f"cpu+gpu ({options.n_gpu_layers} layers)"
        trained = llama_cpp.llama_model_n_ctx_train(llama.model)
        self._max_model_len = min(llama.n_ctx(), trained) if trained > 0 else llama.n_ctx()
        self.engine = LlamaCppStepEngine(llama, options.n_batch)

    async def stop(self) -> None:
        await super().stop()
        llama = getattr(self, "llama", None)
        if llama is not None:
            llama.close()  # frees the model and the context now, not whenever the GC runs
