"""The native backend: our PyTorch engine (engine.py) behind the InProcessBackend machinery.

`load` checks the options, picks the weight format (`NativeOptions.weight_format`: a GGUF
file's own blocks by default where `blocks_fit`, else float32), loads the weights and tokenizer
(loader.py; the blocks through gguf_loader.py), the draft model for speculative decoding
(draft.py), int8-quantizes on request (quant.py), sizes the KV pool (kv_cache.py) and builds
the step engine (engine.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.devices import release_free_memory, resolve_device
from jupyter_llm.backends.inprocess import InProcessBackend
from jupyter_llm.backends.native.block_quant import BlockLinear
from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.draft import draft_pool_blocks, load_draft
from jupyter_llm.backends.native.engine import build_engine
from jupyter_llm.backends.native.fused.ops import fused_ops, unavailable_reason
from jupyter_llm.backends.native.gguf_loader import blocks_refusal, load_gguf_blocks
from jupyter_llm.backends.native.kv_cache import kv_cache_budget, size_kv_pool
from jupyter_llm.backends.native.loader import load_folder, local_folder
from jupyter_llm.backends.native.options import DEFAULT_MAX_NUM_BATCHED_TOKENS, NativeOptions
from jupyter_llm.backends.native.quant import CALIBRATION_TEXT, quantize_int8
from jupyter_llm.backends.native.quant_cache import load_int8_folder
from jupyter_llm.backends.native.seed_gpt2 import is_seed_gpt2_folder
from jupyter_llm.backends.native.speculative import SpeculativeConfig
from jupyter_llm.cpu import cpu_info
from jupyter_llm.errors import ParamError
from jupyter_llm.model_files import ModelSpec, resolve_model
from jupyter_llm.progress import steps

log = logging.getLogger(__name__)


def check_weight_format(dtype_name: str, quantization: str | None, device_type: str, spec: ModelSpec) -> None:
    """Refuse a --dtype/--quantization pair that cannot run on the device or model."""
    if quantization == "int8" and (device_type != "cpu" or dtype_name != "float32"):
        raise ParamError("--quantization int8 runs on the CPU in float32 (use --device cpu --dtype float32)")
    if quantization == "gguf":
        if device_type != "cpu" or dtype_name != "float32":
            raise ParamError("--quantization gguf runs on the CPU in float32 (use --device cpu --dtype float32)")
        if not spec.is_gguf:
            raise ParamError(f"--quantization gguf needs a .gguf model file; {spec.name!r} is not one "
                             "(accepted for it: --quantization int8 or none)")
        if fused_ops() is None:
            raise ParamError(f"--quantization gguf needs the fused CPU ops, which cannot be built here "
                             f"({unavailable_reason()}); use --quantization none")


def blocks_fit(spec: ModelSpec, folder: Path, device_type: str) -> bool:
    """Whether a GGUF file's blocks are the default format: a model that gguf_loader loads in
    blocks (a Llama without projection biases), on the CPU, with the fused ops built for AVX2
    (the scalar fallback of block_ops.cpp is slower than float32's GEMMs)."""
    if not spec.is_gguf or device_type != "cpu" or fused_ops() is None or not cpu_info().has("avx2", "fma", "f16c"):
        return False
    return blocks_refusal(ModelConfig.from_folder(folder)) is None


def weight_format_label(model: torch.nn.Module, dtype_name: str, quantization: str | None) -> str:
    """What the table shows: "float32", "int8 (float32)", "gguf Q4_1/Q8_0 (float32)"."""
    if quantization is None:
        return dtype_name
    if quantization == "gguf":
        formats = sorted({m.format for m in model.modules() if isinstance(m, BlockLinear)})
        return f"gguf {'/'.join(formats)} ({dtype_name})"
    return f"{quantization} ({dtype_name})"


class NativeBackend(InProcessBackend):
    kind = "native"
    options_class = NativeOptions
    capabilities = Capabilities(batching="continuous", prefix_cache=True, speculative=False, structured=True,
                                devices=("cpu", "cuda"))

    def load(self, progress: bool = True) -> None:
        options: NativeOptions = self.options  # type: ignore[assignment]
        options.check()
        self.device = resolve_device(options.device)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        speculative = SpeculativeConfig.from_options(
            options.speculative, options.speculative_config, num_speculative_tokens=options.num_speculative_tokens,
            prompt_lookup_min=options.prompt_lookup_min, prompt_lookup_max=options.prompt_lookup_max,
            draft_model=options.draft_model, draft_quantization=options.draft_quantization,
            disable_by_batch_size=options.speculative_disable_by_batch_size)
        if speculative is not None and speculative.draft_quantization == "int8" and device_type != "cpu":
            raise ParamError("--draft-quantization int8 runs on the CPU (use --device cpu)")
        spec = resolve_model(self.model_arg)
        self.model_name = spec.name
        if options.dtype is not None or options.quantization is not None:
            check_weight_format(*options.weight_format(), device_type, spec)  # before a GGUF file is converted
        folder = local_folder(spec, progress)
        dtype_name, quantization = options.weight_format(blocks_fit(spec, folder, device_type))
        dtype = getattr(torch, dtype_name)
        drafting = speculative is not None and speculative.method == "draft"
        with steps(progress, f"Loading {spec.name} (native)", 3) as bar:
            draft = None
            if quantization == "gguf":
                model, config, self.tokenizer = load_gguf_blocks(Path(spec.path), folder)
                if drafting:
                    draft = load_draft(speculative, model, config, self.tokenizer, dtype, self.device, progress)
                bar.update(2)
            elif quantization == "int8" and not drafting and not is_seed_gpt2_folder(folder):
                model, config, self.tokenizer = load_int8_folder(folder)  # stored once quantized
                bar.update(2)
            else:
                model, config, self.tokenizer = load_folder(folder, dtype, self.device)
                if drafting:
                    draft = load_draft(speculative, model, config, self.tokenizer, dtype, self.device, progress)
                bar.update(1)
                if quantization == "int8":
                    quantize_int8(model, self.tokenizer.encode(CALIBRATION_TEXT))
                bar.update(1)
            limit = config.max_position_embeddings
            if options.max_model_len is not None and not 1 < options.max_model_len <= limit:
                raise ParamError(f"--max-model-len must be in [2, {limit}] for this model, got {options.max_model_len}")
            wanted_len = options.max_model_len or limit
            block_size = options.block_size
            budget = kv_cache_budget(options.kv_cache_bytes(), self.device)
            num_blocks, max_model_len = size_kv_pool(budget, config, block_size, dtype, options.max_num_seqs,
                                                     wanted_len, fixed_len=options.max_model_len is not None)
            if max_model_len < wanted_len:
                log.warning("KV cache holds %d tokens: max_model_len lowered from %d", max_model_len, wanted_len)
            self._max_model_len = max_model_len
            draft_args = None
            if draft is not None:
                draft_model, draft_config = draft
                draft_args = (draft_model, draft_config, draft_pool_blocks(budget, draft_model, draft_config,
                                                                           block_size))
            engine = build_engine(model, config, num_blocks=num_blocks, block_size=block_size,
                                  enable_prefix_caching=options.enable_prefix_caching,
                                  max_num_seqs=options.max_num_seqs,
                                  max_num_batched_tokens=(options.max_num_batched_tokens
                                                          or DEFAULT_MAX_NUM_BATCHED_TOKENS[device_type]),
                                  max_model_len=max_model_len, speculative=speculative, draft=draft_args,
                                  fused_ops=options.fused_ops)
            bar.update(1)
        self.dtype = weight_format_label(model, dtype_name, quantization)
        self.model = model
        self.model_config = config
        self.engine = engine
        release_free_memory()
        self.capabilities = Capabilities(batching="continuous", prefix_cache=options.enable_prefix_caching,
                                         speculative=speculative is not None, structured=True,
                                         devices=("cpu", "cuda"))
