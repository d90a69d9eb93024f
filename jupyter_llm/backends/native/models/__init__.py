"""Plain PyTorch decoder models of the native engine, by `ModelConfig.architecture`."""
from __future__ import annotations

from torch import nn

from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.models.gpt2 import GPT2ForCausalLM
from jupyter_llm.backends.native.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "gpt2": GPT2ForCausalLM}


def build_model(config: ModelConfig) -> nn.Module:
    """The model for `config` with random weights (the loader builds it on the meta device and assigns its own)."""
    return MODEL_CLASSES[config.architecture](config)
