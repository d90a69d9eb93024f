"""The native backend: our PyTorch engine (engine.py) behind the InProcessBackend machinery.

`load` checks the options, loads the weights and tokenizer (loader.py), the draft model for
speculative decoding (draft.py), int8-quantizes on request (quant.py), sizes the KV pool
(kv_cache.py) and builds the step engine (engine.py).
"""
from __future__ import annotations

import logging

import torch

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.devices import release_free_memory, resolve_device
from jupyter_llm.backends.inprocess import InProcessBackend
from jupyter_llm.backends.native.draft import draft_pool_blocks, load_draft
from jupyter_llm.backends.native.engine import build_engine
from jupyter_llm.backends.native.kv_cache import kv_cache_budget, size_kv_pool
from jupyter_llm.backends.native.loader import load_folder, local_folder
from jupyter_llm.backends.native.options import DEFAULT_MAX_NUM_BATCHED_TOKENS, NativeOptions
from jupyter_llm.backends.native.quant import CALIBRATION_TEXT, quantize_int8
from jupyter_llm.backends.native.quant_cache import load_int8_folder
from jupyter_llm.backends.native.seed_gpt2 import is_seed_gpt2_folder
from jupyter_llm.backends.native.speculative import SpeculativeConfig
from jupyter_llm.errors import ParamError
from jupyter_llm.model_files import resolve_model
from jupyter_llm.progress import steps

log = logging.getLogger(__name__)


class NativeBackend(InProcessBackend):
    kind = "native"
    options_class = NativeOptions
    capabilities = Capabilities(batching="continuous", prefix_cache=True, speculative=False, devices=("cpu", "cuda"))

    def load(self, progress: bool = True) -> None:
        options: NativeOptions = self.options  # type: ignore[assignment]
        options.check()
        self.device = resolve_device(options.device)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        dtype_name, quantization = options.weight_format()
        dtype = getattr(torch, dtype_name)
        if quantization == "int8" and (device_type != "cpu" or dtype_name != "float32"):
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
        self.dtype = dtype_name if quantization is None else f"{quantization} ({dtype_name})"
        folder = local_folder(spec, progress)
        drafting = speculative is not None and speculative.method == "draft"
        with steps(progress, f"Loading {spec.name} (native)", 3) as bar:
            draft = None
            if quantization == "int8" and not drafting and not is_seed_gpt2_folder(folder):
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
        self.model = model
        self.model_config = config
        self.engine = engine
        release_free_memory()
        self.capabilities = Capabilities(batching="continuous", prefix_cache=options.enable_prefix_caching,
                                         speculative=speculative is not None, devices=("cpu", "cuda"))
