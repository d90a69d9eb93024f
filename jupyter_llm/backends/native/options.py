"""The options of `%llm_backend native`."""
from __future__ import annotations

from dataclasses import dataclass

from jupyter_llm.backends.options import BackendOptions, parse_memory
from jupyter_llm.errors import ParamError

DTYPES = ("float32", "bfloat16", "float16", "float64")
QUANTIZATIONS = ("gguf", "int8", "none")
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 512, "cuda": 2048}


@dataclass
class NativeOptions(BackendOptions):
    """Options of `%llm_backend native` (names follow vLLM's)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # float32 | bfloat16 | float16 (float64 for exactness tests); None: see weight_format
    # gguf: a GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are (CPU); int8: dynamic int8 linear
    # layers (CPU); none: the dtype's weights. None: see weight_format.
    quantization: str | None = None
    kv_cache_memory: int | str | None = None  # KV pool size: bytes or "1GiB" (default 1 GiB on CPU)
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True  # --no-enable-prefix-caching turns it off
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int | None = None  # tokens per step (default 512 on CPU, 2048 on CUDA)
    max_model_len: int | None = None  # prompt + output tokens (default: the model's context)
    fused_ops: bool = True  # steps through the fused CPU ops (fused/); --no-fused-ops: the eager path
    # Speculative decoding (see speculative.py); vLLM's speculative_config dict is accepted too.
    speculative: str | None = None  # ngram | draft
    speculative_config: dict | str | None = None
    num_speculative_tokens: int | None = None  # guesses per step (default 5)
    prompt_lookup_min: int | None = None  # ngram: shortest suffix to look up (default 1)
    prompt_lookup_max: int | None = None  # ngram: longest suffix to look up (default 4)
    draft_model: str | None = None  # draft: a model with the target's tokenizer (default: the target itself)
    draft_quantization: str | None = None  # draft: int8
    speculative_disable_by_batch_size: int | None = None  # no guesses while more sequences run

    def check(self) -> None:
        """Refuse values no device accepts (the device-dependent checks come with the device)."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ParamError(f"unknown dtype {self.dtype!r}; accepted: {', '.join(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ParamError(f"unknown quantization {self.quantization!r}; accepted: {', '.join(QUANTIZATIONS)}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ParamError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def weight_format(self, blocks_fit: bool = False) -> tuple[str, str | None]:
        """(dtype, quantization or None).

        With neither --dtype nor --quantization: a GGUF file's own blocks where they fit
        (`blocks_fit`, see backend.blocks_fit: a Llama GGUF on a CPU with the AVX2 kernels),
        else float32. The blocks are 3x float32's speed at one stream with float32's
        perplexity, and every step computes a token's row alike (fused/decode.py), so answers
        do not change with speculation, prefix caching or the requests beside them. Not int8:
        fbgemm's dynamic int8 quantizes a step's activations with one scale for all its rows,
        so an answer changes with the requests batched beside it. --dtype alone or
        --quantization none keep the dtype's own weights."""
        if self.dtype is None and self.quantization is None and blocks_fit:
            return "float32", "gguf"
        return self.dtype or "float32", None if self.quantization in (None, "none") else self.quantization

    def kv_cache_bytes(self) -> int | None:
        """--kv-cache-memory in bytes (None: the device's default)."""
        return None if self.kv_cache_memory is None else parse_memory(self.kv_cache_memory)
