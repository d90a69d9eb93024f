"""Shared helpers for the native-engine tests: tiny HF checkpoints and a minimal step driver."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.model_runner import StepItem, build_runner
from manager_helpers import load_keeping_default

VOCAB = 96


def tiny_hf_model(kind: str, dtype: torch.dtype = torch.float32):
    """A random-weight transformers model of the given kind (seeded, eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 10000.0,
    }
    configs = {
        "llama_gqa": lambda: LlamaConfig(**llama),
        "llama3_tied": lambda: LlamaConfig(
            **llama, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
        "llama_linear": lambda: LlamaConfig(**llama, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "gpt2_tied": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
        "gpt2_untied": lambda: GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=False
        ),
    }
    cls = LlamaForCausalLM if kind.startswith("llama") else GPT2LMHeadModel
    return cls(configs[kind]()).to(dtype).eval()


@pytest.fixture
def save_hf(tmp_path) -> Callable:
    """save_hf(hf_model) -> folder holding config.json + model.safetensors."""

    def save(hf_model) -> str:
        folder = tmp_path / "ckpt"
        hf_model.save_pretrained(folder, safe_serialization=True)
        return str(folder)

    return save


class MiniEngine:
    """Drives BlockManager + ModelRunner the way a scheduler would, one explicit step at a time."""

    def __init__(self, model, config: ModelConfig, num_blocks: int = 64, block_size: int = 4,
                 prefix_caching: bool = True) -> None:
        self.runner, self.blocks = build_runner(model, config, num_blocks, block_size, prefix_caching)
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}

    def add(self, seq_id: int, prompt: list[int]) -> int:
        self.tokens[seq_id] = list(prompt)
        self.computed[seq_id] = self.blocks.allocate(seq_id, prompt)
        return self.computed[seq_id]

    def step(self, plan: dict[int, int]) -> dict[int, torch.Tensor]:
        """plan: seq_id -> number of its not-yet-computed tokens to compute now.
        Returns seq_id -> logits [n, V] of those tokens."""
        items = []
        for seq_id, n in plan.items():
            start, end = self.computed[seq_id], self.computed[seq_id] + n
            assert self.blocks.append_slots(seq_id, self.tokens[seq_id][:end], n)
            items.append(StepItem(seq_id, self.tokens[seq_id][start:end], start, self.blocks.block_table(seq_id),
                                  self.blocks.slot_mapping(seq_id, start, end)))
            self.computed[seq_id] = end
        logits = self.runner.run(items, num_logits=list(plan.values()))
        return dict(zip(plan, logits.split(list(plan.values()))))


@pytest.fixture
def tiny_hf() -> Callable:
    """tiny_hf(kind, dtype=torch.float32) -> a random-weight transformers model."""
    return tiny_hf_model


@pytest.fixture
def engine_cls() -> type[MiniEngine]:
    return MiniEngine


@pytest.fixture(scope="session")
def embedded_native(manager, embedded_hf) -> str:
    """The embedded SmolLM2 on the native backend (float32), loaded once per test run."""
    return load_keeping_default(manager, "native", name="embedded-native", progress=False,
                                 kv_cache_memory="256MiB", max_num_seqs=16, dtype="float32")


@pytest.fixture(scope="session")
def tiny_native_unit(manager, tiny_llama) -> str:
    """The tiny llama of tests/tiny_models.py on the native backend."""
    return load_keeping_default(manager, "native", str(tiny_llama), name="unit-tiny-native", progress=False,
                                 kv_cache_memory="8MiB", max_num_batched_tokens=32)


@pytest.fixture(scope="session")
def embedded_native_gguf(manager, embedded_model) -> str:
    """The embedded SmolLM2 on the native backend in its GGUF file's own blocks."""
    return load_keeping_default(manager, "native", name="embedded-native-gguf", progress=False,
                                 kv_cache_memory="256MiB", max_num_seqs=16, quantization="gguf")
