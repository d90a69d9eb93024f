"""The draft model of `--speculative draft`: `--draft-model` (which must share the target's
tokenizer) or a copy of the target's weights, int8-quantized with `--draft-quantization int8`,
and the size of its own KV pool. `DraftModelProposer` (proposers.py) guesses with it."""
from __future__ import annotations

import copy

import torch
from torch import nn

from jupyter_llm.backends.native.block_quant import BlockLinear
from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.kv_cache import KVCachePool
from jupyter_llm.backends.native.loader import load_folder, local_folder
from jupyter_llm.backends.native.quant import CALIBRATION_TEXT, quantize_int8
from jupyter_llm.backends.native.speculative import SpeculativeConfig
from jupyter_llm.errors import ParamError
from jupyter_llm.model_files import resolve_model
from jupyter_llm.tokenizers import Tokenizer


def load_draft(speculative: SpeculativeConfig, target: nn.Module, target_config: ModelConfig, tokenizer: Tokenizer,
               dtype: torch.dtype, device: str, progress: bool) -> tuple[nn.Module, ModelConfig]:
    """The draft model and its config; `tokenizer` is the target's."""
    if speculative.draft_model is None:
        draft, draft_config = copy.deepcopy(target), target_config
    else:
        spec = resolve_model(speculative.draft_model)
        draft, draft_config, draft_tokenizer = load_folder(local_folder(spec, progress), dtype, device)
        if not same_vocabulary(draft_tokenizer, tokenizer):
            raise ParamError(f"the draft model {spec.name!r} does not share the target's tokenizer "
                             "(different vocabulary); speculative decoding needs the same token ids")
    # A draft in GGUF blocks (a copy of a gguf target) is already smaller and faster than int8: kept.
    if speculative.draft_quantization == "int8" and not any(isinstance(m, BlockLinear) for m in draft.modules()):
        quantize_int8(draft, tokenizer.encode(CALIBRATION_TEXT))
    return draft, draft_config


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two `Tokenizer`s map the same strings to the same ids."""
    return len(a.hf) == len(b.hf) and a.hf.get_vocab() == b.hf.get_vocab()


def draft_pool_blocks(budget: int, draft: nn.Module, config: ModelConfig, block_size: int) -> int:
    """Blocks of the draft's pool: half the target's budget (no guesses when it is full), at least 2."""
    dtype = next(draft.parameters()).dtype
    return max(KVCachePool.num_blocks_for_budget(budget // 2, config, block_size, dtype), 2)
