"""The ONNX Runtime GenAI backend: a model exported by the GenAI model builder (fp32, int8
or int4 weights) run by its `Generator`, on CPU or CUDA.

The generator runs the model; everything after the logits is shared code. Each step
reads the logits of every row (`get_logits`), samples them with the shared `Sampler`
(so seeds, penalties, top-k/top-p/min-p and logprobs behave as on the other in-process
backends), and hands the chosen tokens back as one-hot logits (`set_logits`) that the
generator's greedy search appends (`generate_next_token`): for a batch the generator
accepts `append_tokens` only once, for the prompts.

Batching is static: the waiting requests start together as one right-padded batch, and
requests that arrive while a batch runs wait for the next one (the generator cannot add
rows). A finished or cancelled row stays in the batch, fed but no longer sampled, until
every row is done; then the generator and its KV cache are freed.
"""
from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import torch

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.inprocess import InProcessBackend, LogprobEntry, StepEngine
from jupyter_llm.backends.onnx.export import PRECISIONS, PROVIDERS, export_folder, export_metadata, is_genai_folder
from jupyter_llm.backends.options import BackendOptions
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.model_files import resolve_model
from jupyter_llm.progress import steps
from jupyter_llm.sampling import Sampler
from jupyter_llm.tokenizers import Tokenizer, load_tokenizer

DEFAULT_PRECISION = "int4"
# Padding is marked by the pad id, and the generator masks EVERY trailing pad id, even a real
# last prompt token (<|im_end|> is SmolLM2's pad id). -1 is never a real token; the embedding's
# Gather still accepts it (negative indices count from the end), and padded positions are masked.
_PAD = -1
_NOT_CHOSEN = -1e9


@dataclass
class ONNXOptions(BackendOptions):
    precision: str | None = None  # fp32 | int8 | int4 weights of the export (default int4)
    execution_provider: str = "cpu"  # cpu | cuda
    max_num_seqs: int = 16  # rows in one batch
    max_model_len: int | None = None  # default: the model's context length
    export_dir: str | None = None  # where exports are cached (default: <model cache>/onnx)


def _eos_ids(genai_config: dict) -> tuple[int, ...]:
    eos = genai_config["model"].get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)


class ONNXStepEngine(StepEngine):
    """Static batches on an ONNX Runtime GenAI generator, sampled by the shared sampler."""

    def __init__(self, model: og.Model, max_num_seqs: int, max_model_len: int, end_ids: tuple[int, ...]):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.end_ids = list(end_ids)  # the generator stops a row that gets one of these
        self.sampler = Sampler()
        self.waiting: deque[EngineSequence] = deque()
        self.rows: list[EngineSequence] = []  # the running batch, one sequence per generator row
        self.removed: set[int] = set()
        self.generator: og.Generator | None = None
        self.chosen: np.ndarray | None = None  # the tokens sampled last step, one per row, fed at the next step
        self.one_hot: np.ndarray | None = None  # [rows, vocab] buffer that hands the chosen tokens to the generator

    def add(self, seq: EngineSequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: EngineSequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif any(row is seq for row in self.rows):
            self.removed.add(seq.seq_id)
            if len(self.removed) == len(self.rows):
                self._end_batch()

    def has_work(self) -> bool:
        return bool(self.waiting) or len(self.removed) < len(self.rows)

    def counts(self) -> tuple[int, int]:
        return len(self.rows) - len(self.removed), len(self.waiting)

    def stats(self) -> dict[str, Any]:
        return {"batch_rows": len(self.rows)}

    def step(self) -> list[tuple[EngineSequence, int, LogprobEntry | None]]:
        logits = self._decode() if self.generator is not None else self._start_batch()
        live = [i for i, seq in enumerate(self.rows) if seq.seq_id not in self.removed]
        rows = torch.from_numpy(np.ascontiguousarray(logits[live, -1, :], dtype=np.float32))
        for i, row in enumerate(live):
            if self.rows[row].params.ignore_eos:
                # As the generator's min_length: an end token would stop the row inside the generator.
                rows[i, self.end_ids] = float("-inf")
        sampled = self.sampler(rows, [self.rows[i].sampling for i in live])
        self.chosen[live] = sampled.token_ids
        return [(self.rows[i], token, logprob) for i, token, logprob in zip(live, sampled.token_ids, sampled.logprobs)]

    def _start_batch(self) -> np.ndarray:
        """Prefill the waiting sequences that fit together in one generator; their logits."""
        width = steps = 0
        while self.waiting and len(self.rows) < self.max_num_seqs:
            seq = self.waiting[0]
            length = len(seq.token_ids)
            wanted = min(seq.params.max_tokens, self.max_model_len - length)
            # Every row shares one KV buffer of width + steps positions; keep it within the context.
            if self.rows and max(width, length) + max(steps, wanted) > self.max_model_len:
                break
            self.rows.append(self.waiting.popleft())
            width, steps = max(width, length), max(steps, wanted)
        params = og.GeneratorParams(self.model)
        params.set_search_options(batch_size=len(self.rows), max_length=width + steps, do_sample=False,
                                  num_beams=1, min_length=0, repetition_penalty=1.0)
        self.generator = og.Generator(self.model, params)
        ids = np.full((len(self.rows), width), _PAD, dtype=np.int32)
        for row, seq in enumerate(self.rows):  # right padding: what the generator's batching expects
            ids[row, :len(seq.token_ids)] = seq.token_ids
        self.generator.append_tokens(ids)
        logits = self.generator.get_logits()
        self.chosen = np.zeros(len(self.rows), dtype=np.int64)
        self.one_hot = np.full((len(self.rows), logits.shape[-1]), _NOT_CHOSEN, dtype=np.float32)
        return logits

    def _decode(self) -> np.ndarray:
        """Append last step's tokens (as one-hot logits for the greedy search) and run the model."""
        rows = np.arange(len(self.rows))
        self.one_hot[rows, self.chosen] = 0.0
        self.generator.set_logits(self.one_hot)
        self.one_hot[rows, self.chosen] = _NOT_CHOSEN
        self.generator.generate_next_token()
        return self.generator.get_logits()

    def _end_batch(self) -> None:
        self.generator = self.chosen = self.one_hot = None  # frees the KV cache now
        self.rows, self.removed = [], set()


class ONNXBackend(InProcessBackend):
    kind = "onnx"
    options_class = ONNXOptions
    capabilities = Capabilities(batching="static", structured=True, devices=("cpu", "cuda"))

    @property
    def threads(self) -> int:
        """Torch threads, for the shared sampler only. ONNX Runtime runs the model on its own pool
        (--threads) whose workers spin a while after each run; a second torch thread fighting
        them slows sampling many times over."""
        return 1

    def load(self, progress: bool = True) -> None:
        options: ONNXOptions = self.options  # type: ignore[assignment]
        if options.precision is not None and options.precision not in PRECISIONS:
            raise ParamError(f"unknown precision {options.precision!r}; accepted: {', '.join(PRECISIONS)}")
        if options.max_num_seqs < 1:
            raise ParamError(f"--max-num-seqs must be >= 1, got {options.max_num_seqs}")
        if options.execution_provider not in PROVIDERS:
            raise ParamError(f"unknown execution provider {options.execution_provider!r}; "
                             f"accepted: {', '.join(PROVIDERS)}")
        if options.execution_provider == "cuda" and not og.is_cuda_available():
            raise BackendError("--execution-provider cuda needs the CUDA build of ONNX Runtime GenAI and a GPU: "
                               "pip uninstall onnxruntime-genai && pip install onnxruntime-genai-cuda")
        folder = self._model_folder(progress)
        genai_config = json.loads((folder / "genai_config.json").read_text())
        with steps(progress, f"Loading {self.model_name} (ONNX Runtime GenAI)", 2) as bar:
            config = og.Config(str(folder))
            config.overlay(json.dumps({"model": {"pad_token_id": _PAD, "decoder": {
                "session_options": {"intra_op_num_threads": options.threads or os.cpu_count() or 1}}}}))
            config.clear_providers()
            if options.execution_provider == "cuda":
                config.append_provider("cuda")
            self.og_model = og.Model(config)
            bar.update(1)
            end_ids = _eos_ids(genai_config)
            # The generator's end tokens must end a sample here too: it feeds such a row padding after.
            tokenizer = load_tokenizer(str(folder))
            self.tokenizer = Tokenizer(tokenizer.hf, tuple(tokenizer.eos_token_ids) + end_ids)
            bar.update(1)
        context = int(genai_config["model"]["context_length"])
        self._max_model_len = min(options.max_model_len or context, context)
        self.device = options.execution_provider
        self.folder = folder
        self.engine = ONNXStepEngine(self.og_model, options.max_num_seqs, self._max_model_len, end_ids)

    def _model_folder(self, progress: bool) -> Path:
        """The GenAI folder to load: the one given, or the (cached) export of a resolved model."""
        options: ONNXOptions = self.options  # type: ignore[assignment]
        if self.model_arg and is_genai_folder(Path(self.model_arg).expanduser()):
            if options.precision is not None:
                raise ParamError(f"{self.model_arg} already holds an exported ONNX model; --precision applies "
                                 f"only when exporting a Hugging Face model")
            folder = Path(self.model_arg).expanduser().resolve()
            self.model_name = folder.name
            self.dtype = export_metadata(folder).get("precision", "onnx")
            return folder
        spec = resolve_model(self.model_arg)
        precision = options.precision or DEFAULT_PRECISION
        self.model_name, self.dtype = spec.name, precision
        return export_folder(spec, precision, options.execution_provider, progress, options.export_dir)
